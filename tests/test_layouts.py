"""Every checkpoint layout the releases and fine-tunes use converts to the same GGUF."""

import copy

import pytest

from qwen35.convert.pipeline import Conversion
from qwen35.demo.synthetic import write_checkpoint
from tests.tiny import byte_level_tokenizer, gguf_contents, rewrite_checkpoint, split_fused_experts, tiny_config


def convert(config, directory, **layout):
    ckpt = write_checkpoint(directory / "ckpt", config, seed=5, **layout)
    byte_level_tokenizer(ckpt)
    return Conversion(ckpt, ["f32"], directory / "out.gguf").run()[0].path


def causal_lm(config):
    """The same text model as a text-only Qwen3_5ForCausalLM checkpoint (flat config, `model.*` keys)."""
    flat = copy.deepcopy(config["text_config"])
    moe = "num_experts" in flat
    flat.update(architectures=["Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"],
                model_type="qwen3_5_moe_text" if moe else "qwen3_5_text")
    return flat


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_text_only_causal_lm_converts_like_the_vision_language_release(moe, tmp_path):
    config = tiny_config(moe=moe)
    released = convert(config, tmp_path / "vl", vision=False)
    text_only = convert(causal_lm(config), tmp_path / "text")
    assert gguf_contents(text_only)[1] == gguf_contents(released)[1]


def test_fused_and_per_expert_layouts_give_identical_gguf_contents(tmp_path):
    fused = write_checkpoint(tmp_path / "fused", tiny_config(moe=True), seed=5, experts="fused")
    byte_level_tokenizer(fused)
    per_expert = rewrite_checkpoint(fused, tmp_path / "per_expert", split_fused_experts)
    # As the MoE release ships: fused decoder layers, a per-expert MTP layer.
    mixed = rewrite_checkpoint(fused, tmp_path / "mixed",
                               lambda n, raw: split_fused_experts(n, raw) if n.startswith("mtp.") else [(n, raw)])
    assert "mtp.layers.0.mlp.experts.3.up_proj.weight" in (mixed / "model.safetensors").read_bytes()[:100000].decode("latin-1")
    out = [Conversion(ckpt, ["f32"], tmp_path / f"{ckpt.name}.gguf").run()[0].path for ckpt in (fused, per_expert, mixed)]
    assert gguf_contents(out[0])[1] == gguf_contents(out[1])[1] == gguf_contents(out[2])[1]


def test_a_checkpoint_rewritten_in_shards_converts_to_the_same_gguf(tmp_path):
    # (The MTP bench's 9B fixtures are rewritten a shard at a time, to bound the memory it takes.)
    whole = write_checkpoint(tmp_path / "whole", tiny_config(), seed=5)
    byte_level_tokenizer(whole)
    sharded = rewrite_checkpoint(whole, tmp_path / "sharded", lambda n, raw: [(n, raw)], shard_bytes=64 * 1024)
    assert len(list(sharded.glob("model.safetensors-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    out = [Conversion(ckpt, ["f32"], tmp_path / f"{ckpt.name}.gguf").run()[0].path for ckpt in (whole, sharded)]
    assert gguf_contents(out[0])[1] == gguf_contents(out[1])[1]


def test_mtp_num_hidden_layers_zero_writes_no_mtp_block(tmp_path):
    meta, out = gguf_contents(convert(tiny_config(mtp_num_hidden_layers=0), tmp_path))
    assert meta["qwen35.block_count"] == 4 and meta["qwen35.nextn_predict_layers"] == 0
    assert not [n for n in out if n.startswith("blk.4.")]


def test_no_mtp_drops_the_head_and_its_recurrent_flag(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_config(), seed=5)
    byte_level_tokenizer(ckpt)
    with_mtp = Conversion(ckpt, ["f32"], tmp_path / "mtp.gguf").run()[0].path
    without = Conversion(ckpt, ["f32"], tmp_path / "no-mtp.gguf", mtp=False, mmproj=None).run()[0].path
    meta, out = gguf_contents(with_mtp)
    assert meta["qwen35.block_count"] == 5 and meta["qwen35.nextn_predict_layers"] == 1
    assert meta["qwen35.attention.recurrent_layers"] == [True, True, True, False, False]
    assert "blk.4.nextn.eh_proj.weight" in out
    meta, out = gguf_contents(without)
    assert meta["qwen35.block_count"] == 4 and meta["qwen35.nextn_predict_layers"] == 0
    assert meta["qwen35.attention.recurrent_layers"] == [True, True, True, False]
    assert not [n for n in out if n.startswith("blk.4.")]


def test_layer_pattern_comes_from_layer_types_not_an_interval(tmp_path):
    types = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    meta, out = gguf_contents(convert(tiny_config(layer_types=types), tmp_path))
    assert meta["qwen35.attention.recurrent_layers"][:4] == [True, False, True, True]
    assert "blk.1.attn_q.weight" in out and "blk.3.ssm_out.weight" in out


def test_vision_tower_is_left_out(tmp_path):
    _, out = gguf_contents(convert(tiny_config(), tmp_path, vision=True))
    assert not [n for n in out if "visual" in n or n.startswith("v.")]


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    _, out = gguf_contents(convert(tiny_config(), tmp_path))
    assert "output.weight" not in out and "token_embd.weight" in out
