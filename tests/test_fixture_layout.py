"""The transformers-built fixtures have the release layout that tests/fixtures.py promises."""

import json

import pytest
from safetensors import safe_open

from tests.fixtures import FIXTURES, HIDDEN


def read_headers(checkpoint) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} over all safetensors files of a checkpoint."""
    headers = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                view = f.get_slice(name)
                headers[name] = (view.get_dtype(), view.get_shape())
    return headers


@pytest.mark.parametrize("name", list(FIXTURES))
def test_release_layout(name, qwen35_fixture):
    fixture = qwen35_fixture(name)
    spec, checkpoint = fixture.spec, fixture.checkpoint
    headers = read_headers(checkpoint)

    assert all(n.startswith(("model.language_model.", "model.visual.", "mtp.", "lm_head.")) for n in headers)
    assert any(n.startswith("model.visual.") for n in headers)
    assert ("lm_head.weight" in headers) == (not spec.tied)
    for tensor, (dtype, _) in headers.items():
        f32 = tensor.endswith(("linear_attn.A_log", "linear_attn.norm.weight"))
        assert dtype == ("F32" if f32 else "BF16"), tensor

    mtp = {n for n in headers if n.startswith("mtp.")}
    if spec.mtp:
        assert headers["mtp.fc.weight"][1] == [HIDDEN, 2 * HIDDEN]
        assert {"mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"} <= mtp
        assert "mtp.layers.0.self_attn.q_proj.weight" in mtp
    else:
        assert not mtp

    if spec.moe:
        fused = "model.language_model.layers.0.mlp.experts.gate_up_proj" in headers
        per_expert = "model.language_model.layers.0.mlp.experts.0.gate_proj.weight" in headers
        assert (fused, per_expert) == (spec.fused_experts, not spec.fused_experts)
        assert not any(n.endswith("gate_up_proj.weight") for n in headers)
        if spec.mtp:  # the MTP layer is per-expert in every release
            assert "mtp.layers.0.mlp.experts.0.gate_proj.weight" in mtp

    index = checkpoint / "model.safetensors.index.json"
    if spec.shards > 1:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(headers)
        assert len(set(weight_map.values())) == spec.shards
        assert all(f"-of-{spec.shards:05d}.safetensors" in shard for shard in weight_map.values())
    else:
        assert not index.exists() and (checkpoint / "model.safetensors").is_file()


def test_config_is_nested_like_the_release(qwen35_fixture):
    config = json.loads((qwen35_fixture("dense_tied_no_mtp").checkpoint / "config.json").read_text())
    text = config["text_config"]
    assert config["tie_word_embeddings"] is True and "tie_word_embeddings" not in text
    assert text["mtp_num_hidden_layers"] == 0
    rope = text["rope_parameters"]
    assert sum(rope["mrope_section"]) * 2 == int(text["head_dim"] * rope["partial_rotary_factor"])
    assert text["layer_types"].count("full_attention") * 3 == text["layer_types"].count("linear_attention")
