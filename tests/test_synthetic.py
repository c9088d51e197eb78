"""The synthetic checkpoint writer produces valid safetensors in the Qwen3.5 release layout."""

import json
import struct

import numpy as np
import pytest
from safetensors import safe_open

from qwen35.demo.synthetic import _ChunkWriter, write_checkpoint

H, HEAD_DIM, N_HEADS, N_KV_HEADS = 64, 16, 4, 2
LK, LV, DK, DV, CONV_K = 2, 4, 16, 16, 4  # k != v heads, as in 4B and larger
INTER, VOCAB = 96, 320
N_EXPERTS, EXPERT_INTER, SHARED_INTER = 4, 32, 48


def tiny_config(*, moe=False, tied=True, wrapper=True):
    text = {
        "hidden_size": H,
        "head_dim": HEAD_DIM,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS,
        "linear_num_key_heads": LK,
        "linear_num_value_heads": LV,
        "linear_key_head_dim": DK,
        "linear_value_head_dim": DV,
        "linear_conv_kernel_dim": CONV_K,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "full_attention_interval": 4,
        "mtp_num_hidden_layers": 1,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
    }
    if moe:
        text |= {
            "num_experts": N_EXPERTS,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": EXPERT_INTER,
            "shared_expert_intermediate_size": SHARED_INTER,
        }
    else:
        text["intermediate_size"] = INTER
    if not wrapper:
        return {"architectures": ["Qwen3_5ForCausalLM"], "tie_word_embeddings": tied, **text}
    arch = "Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"
    return {
        "architectures": [arch],
        "text_config": text,
        "tie_word_embeddings": tied,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": H,
                          "patch_size": 4, "num_position_embeddings": 16},
    }


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__")
    return header, 8 + n


def read_all_headers(ckpt):
    """{name: (file, header entry, data start)} across all shards."""
    entries = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        header, data_start = read_header(path)
        for name, entry in header.items():
            assert name not in entries
            entries[name] = (path, entry, data_start)
    return entries


def read_bf16_as_f32(path, entry, data_start):
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def layer_layout(p, layer_type, *, moe, experts):
    """Expected {name: (dtype, shape)} of one decoder layer, written out by hand."""
    out = {p + "input_layernorm.weight": ("BF16", [H]), p + "post_attention_layernorm.weight": ("BF16", [H])}
    if layer_type == "full_attention":
        a = p + "self_attn."
        out |= {
            a + "q_proj.weight": ("BF16", [2 * N_HEADS * HEAD_DIM, H]),
            a + "k_proj.weight": ("BF16", [N_KV_HEADS * HEAD_DIM, H]),
            a + "v_proj.weight": ("BF16", [N_KV_HEADS * HEAD_DIM, H]),
            a + "o_proj.weight": ("BF16", [H, N_HEADS * HEAD_DIM]),
            a + "q_norm.weight": ("BF16", [HEAD_DIM]),
            a + "k_norm.weight": ("BF16", [HEAD_DIM]),
        }
    else:
        a = p + "linear_attn."
        channels = 2 * LK * DK + LV * DV
        out |= {
            a + "in_proj_qkv.weight": ("BF16", [channels, H]),
            a + "in_proj_z.weight": ("BF16", [LV * DV, H]),
            a + "in_proj_b.weight": ("BF16", [LV, H]),
            a + "in_proj_a.weight": ("BF16", [LV, H]),
            a + "conv1d.weight": ("BF16", [channels, 1, CONV_K]),
            a + "A_log": ("F32", [LV]),
            a + "dt_bias": ("BF16", [LV]),
            a + "norm.weight": ("F32", [DV]),
            a + "out_proj.weight": ("BF16", [H, LV * DV]),
        }
    m = p + "mlp."
    if not moe:
        return out | {
            m + "gate_proj.weight": ("BF16", [INTER, H]),
            m + "up_proj.weight": ("BF16", [INTER, H]),
            m + "down_proj.weight": ("BF16", [H, INTER]),
        }
    out |= {
        m + "gate.weight": ("BF16", [N_EXPERTS, H]),
        m + "shared_expert.gate_proj.weight": ("BF16", [SHARED_INTER, H]),
        m + "shared_expert.up_proj.weight": ("BF16", [SHARED_INTER, H]),
        m + "shared_expert.down_proj.weight": ("BF16", [H, SHARED_INTER]),
        m + "shared_expert_gate.weight": ("BF16", [1, H]),
    }
    if experts == "fused":
        return out | {
            m + "experts.gate_up_proj": ("BF16", [N_EXPERTS, 2 * EXPERT_INTER, H]),
            m + "experts.down_proj": ("BF16", [N_EXPERTS, H, EXPERT_INTER]),
        }
    for j in range(N_EXPERTS):
        e = f"{m}experts.{j}."
        out |= {
            e + "gate_proj.weight": ("BF16", [EXPERT_INTER, H]),
            e + "up_proj.weight": ("BF16", [EXPERT_INTER, H]),
            e + "down_proj.weight": ("BF16", [H, EXPERT_INTER]),
        }
    return out


def expected_text_layout(*, moe=False, tied=True, mtp=True, experts="fused", mtp_experts=None, prefix="model.language_model."):
    out = {prefix + "embed_tokens.weight": ("BF16", [VOCAB, H]), prefix + "norm.weight": ("BF16", [H])}
    for i, layer_type in enumerate(["linear_attention"] * 3 + ["full_attention"]):
        out |= layer_layout(f"{prefix}layers.{i}.", layer_type, moe=moe, experts=experts)
    if not tied:
        out["lm_head.weight"] = ("BF16", [VOCAB, H])
    if mtp:
        out |= {
            "mtp.fc.weight": ("BF16", [H, 2 * H]),
            "mtp.pre_fc_norm_embedding.weight": ("BF16", [H]),
            "mtp.pre_fc_norm_hidden.weight": ("BF16", [H]),
            "mtp.norm.weight": ("BF16", [H]),
        }
        out |= layer_layout("mtp.layers.0.", "full_attention", moe=moe, experts=mtp_experts or experts)
    return out


def text_entries(entries):
    return {
        name: (e["dtype"], e["shape"]) for name, (_, e, _) in entries.items() if not name.startswith("model.visual.")
    }


def test_dense_tied_single_file(tmp_path):
    config = tiny_config()
    ckpt = write_checkpoint(tmp_path, config)

    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json"]
    assert json.loads((ckpt / "config.json").read_text()) == config
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [248046, 248044] and generation["pad_token_id"] == 248044
    assert generation["do_sample"] is True and generation["top_k"] == 20

    entries = read_all_headers(ckpt)
    assert text_entries(entries) == expected_text_layout()
    visual = [n for n in entries if n.startswith("model.visual.")]
    assert "model.visual.patch_embed.proj.weight" in visual and any(".blocks.0." in n for n in visual)

    # The real safetensors library accepts the file; F32 tensors load through numpy.
    with safe_open(ckpt / "model.safetensors", framework="numpy") as f:
        assert set(f.keys()) == set(entries)
        a_log = f.get_tensor("model.language_model.layers.0.linear_attn.A_log")
        gated_norm = f.get_tensor("model.language_model.layers.0.linear_attn.norm.weight")
    assert a_log.dtype == np.float32 and np.all((a_log >= 0) & (a_log <= np.log(16) + 1e-6))
    assert gated_norm.dtype == np.float32 and abs(gated_norm.mean() - 1) < 0.05


def test_bf16_values_are_plausible_and_not_degenerate(tmp_path):
    ckpt = write_checkpoint(tmp_path, tiny_config(), vision=False)
    entries = read_all_headers(ckpt)

    embed = read_bf16_as_f32(*entries["model.language_model.embed_tokens.weight"])
    assert abs(embed.std() - 0.02) < 0.002 and abs(embed.mean()) < 0.002
    assert len(np.unique(embed, axis=0)) == VOCAB  # no repeated rows

    norm = read_bf16_as_f32(*entries["model.language_model.layers.0.input_layernorm.weight"])
    assert np.abs(norm).max() < 0.2  # stored as an offset from 1


def test_bf16_matches_torch_widening(tmp_path):
    """Where torch is available, it reads our BF16 bytes as the same values."""
    torch = pytest.importorskip("torch")
    ckpt = write_checkpoint(tmp_path, tiny_config(), vision=False)
    entries = read_all_headers(ckpt)
    name = "model.language_model.layers.3.self_attn.q_proj.weight"
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        ours = f.get_tensor(name)
    assert ours.dtype == torch.bfloat16
    np.testing.assert_array_equal(ours.float().numpy(), read_bf16_as_f32(*entries[name]))


def test_bf16_rounding_is_nearest_even():
    writer = _ChunkWriter(seed=0)
    values = np.array(
        [
            1.0,
            struct.unpack("<f", struct.pack("<I", 0x3F808000))[0],  # tie, even below: rounds down
            struct.unpack("<f", struct.pack("<I", 0x3F818000))[0],  # tie, odd below: rounds up
            struct.unpack("<f", struct.pack("<I", 0x3F808001))[0],  # above the tie: rounds up
            -2.5,
        ],
        dtype=np.float32,
    )
    assert writer._to_bf16(values).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020]


def test_sharding_and_index(tmp_path):
    config = tiny_config(moe=True, tied=False)
    ckpt = write_checkpoint(tmp_path, config, shard_bytes=40_000)

    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model.safetensors-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (ckpt / "model.safetensors").exists()

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    entries = read_all_headers(ckpt)
    assert index["weight_map"] == {name: path.name for name, (path, _, _) in entries.items()}
    sizes = {name: e["data_offsets"][1] - e["data_offsets"][0] for name, (_, e, _) in entries.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for shard in shards:
        with safe_open(ckpt / shard, framework="numpy") as f:
            assert set(f.keys()) == {name for name, file in index["weight_map"].items() if file == shard}

    assert text_entries(entries) == expected_text_layout(moe=True, tied=False)

    # Rewriting into the same directory as a single file leaves no stale shards behind.
    write_checkpoint(ckpt, config)
    assert sorted(p.name for p in ckpt.glob("model.safetensors*")) == ["model.safetensors"]


@pytest.mark.parametrize(
    "experts, mtp_experts", [("fused", None), ("per_expert", None), ("fused", "per_expert")]
)
def test_moe_expert_layouts(tmp_path, experts, mtp_experts):
    ckpt = write_checkpoint(tmp_path, tiny_config(moe=True), experts=experts, mtp_experts=mtp_experts)
    assert text_entries(read_all_headers(ckpt)) == expected_text_layout(
        moe=True, experts=experts, mtp_experts=mtp_experts
    )


def test_without_mtp_and_vision(tmp_path):
    ckpt = write_checkpoint(tmp_path, tiny_config(), mtp=False, vision=False)
    entries = read_all_headers(ckpt)
    assert text_entries(entries) == expected_text_layout(mtp=False)
    assert len(entries) == len(expected_text_layout(mtp=False))


def test_text_only_config_uses_model_prefix(tmp_path):
    ckpt = write_checkpoint(tmp_path, tiny_config(wrapper=False, tied=False))
    entries = read_all_headers(ckpt)
    assert text_entries(entries) == expected_text_layout(tied=False, prefix="model.")
    assert len(entries) == len(text_entries(entries))  # no vision tower without a vision_config wrapper


def test_seed_determinism(tmp_path):
    config = tiny_config()
    a = write_checkpoint(tmp_path / "a", config, seed=1)
    b = write_checkpoint(tmp_path / "b", config, seed=1)
    c = write_checkpoint(tmp_path / "c", config, seed=2)
    data = [(d / "model.safetensors").read_bytes() for d in (a, b, c)]
    assert data[0] == data[1] != data[2]
