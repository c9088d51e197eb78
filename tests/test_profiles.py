"""Quantization profiles: selectors on hand-made numbers, the shipped profiles, and bad profile files."""

import re

import numpy as np
import pytest
from click.testing import CliRunner

from qwen35.cli import main
from qwen35.convert import ConvertError, profiles
from qwen35.convert.gguf_file import GGUFFile, TensorSpec
from qwen35.gguf_header import read_header
from qwen35.convert.pipeline import Conversion
from qwen35.convert.plan import PlannedTensor
from qwen35.demo.synthetic import write_checkpoint
from tests.tiny import byte_level_tokenizer, tiny_config

T = profiles.T


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("profiles") / "ckpt", tiny_config(hidden_size=256, intermediate_size=512))
    byte_level_tokenizer(path)
    return path


def planned(name, shape):
    return PlannedTensor(name, shape, "BF16", ())


def facts(n_blocks=5, **kw):
    layer_types = ("linear_attention", "linear_attention", "linear_attention", "full_attention")
    return profiles.ModelFacts(n_blocks, layer_types, kw.pop("gqa", 2), kw.pop("n_experts", 0), kw.pop("tied", True), **kw)


def test_more_bits_selects_the_first_and_last_eighth_and_every_third_layer():
    # n = 25 (24 layers + MTP): n/8 = 3, 7n/8 = 21, then every third from layer 3 + 2.
    chosen = [i for i in range(25) if profiles._more_bits(i, 25)]
    assert chosen == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23, 24]


def test_layer_selectors_on_hand_made_numbers():
    assert [i for i in range(16) if profiles._layer_predicate("first_eighth")(i, 16)] == [0, 1]
    assert [i for i in range(32) if profiles._layer_predicate("first_sixteenth")(i, 32)] == [0, 1]
    assert [i for i in range(8) if profiles._layer_predicate("middle")(i, 8)] == [1, 2, 3, 4, 5, 6]
    assert [i for i in range(9) if profiles._layer_predicate("last:2")(i, 9)] == [7, 8]


def test_norms_routers_and_conv_stay_f32_at_any_type():
    q4 = profiles.load("q4_k_m")
    for name, shape in [("blk.0.attn_norm.weight", (256,)), ("blk.0.ssm_conv1d.weight", (512, 4)),
                        ("blk.0.ffn_gate_inp.weight", (4, 256)), ("blk.0.ssm_a", (4,))]:
        assert q4.choose(planned(name, shape), facts()).type == T.F32


def test_q4_k_m_raises_v_and_ffn_down_of_more_bits_layers():
    q4, f = profiles.load("q4_k_m"), facts()
    assert q4.choose(planned("blk.2.attn_qkv.weight", (512, 256)), f).type == T.Q6_K  # more_bits(2, 5)
    assert q4.choose(planned("blk.1.attn_qkv.weight", (512, 256)), f).type == T.Q4_K
    assert q4.choose(planned("blk.4.ffn_down.weight", (256, 512)), f).type == T.Q6_K
    assert q4.choose(planned("blk.0.ssm_out.weight", (256, 256)), f).type == T.Q4_K


def test_tied_embedding_is_quantized_like_the_output():
    q4 = profiles.load("q4_k_m")
    emb = planned("token_embd.weight", (512, 256))
    assert q4.choose(emb, facts(tied=True)).type == T.Q6_K
    assert q4.choose(emb, facts(tied=False)).type == T.Q4_K


def test_hybrid_keeps_linear_attention_projections_at_q8_0_only():
    hybrid, f = profiles.load("q4_k_m-hybrid"), facts()
    assert hybrid.choose(planned("blk.0.attn_qkv.weight", (512, 256)), f).type == T.Q8_0
    assert hybrid.choose(planned("blk.1.ssm_out.weight", (256, 256)), f).type == T.Q8_0
    assert hybrid.choose(planned("blk.2.attn_gate.weight", (256, 256)), f).type == T.Q8_0
    assert hybrid.choose(planned("blk.4.nextn.eh_proj.weight", (256, 512)), f).type == T.Q8_0
    # Full-attention tensors follow Q4_K_M as before.
    assert hybrid.choose(planned("blk.3.attn_q.weight", (512, 256)), f).type == T.Q4_K
    assert hybrid.choose(planned("blk.4.attn_v.weight", (64, 256)), f).type == T.Q6_K


def test_a_type_the_rows_cannot_take_falls_back_as_llama_cpp_does_and_says_so():
    choice = profiles.load("q4_k_m").choose(planned("blk.0.attn_gate.weight", (64, 96)), facts())
    assert choice.type == T.Q5_0  # Q4_K needs rows of 256; Q5_0 takes 32
    assert "fell back to Q5_0" in choice.reason
    assert profiles.load("q4_k_m").choose(planned("blk.0.attn_gate.weight", (64, 48)), facts()).type == T.F16


def test_every_shipped_profile_loads_and_describes_itself():
    for name in profiles.available():
        profile = profiles.load(name)
        assert profile.description, name


def write_profile(tmp_path, text, name="mine.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_malformed_profile_names_its_line(tmp_path):
    path = write_profile(tmp_path, 'base = "q4_k"\n\n[[rule]]\ntensors = "ffn\n')
    with pytest.raises(ConvertError, match=r"line 4"):
        profiles.load(path)


def test_a_profile_rule_with_an_unknown_type_is_refused_with_its_line(tmp_path):
    path = write_profile(tmp_path, 'base = "q4_k"\n[[rule]]\ntensors = "ffn_up"\ntype = "q9_k"\nreason = "x"\n')
    with pytest.raises(ConvertError, match=r"line 3.*unknown tensor type 'q9_k'"):
        profiles.load(path)


def test_a_profile_with_an_unknown_key_is_refused(tmp_path):
    path = write_profile(tmp_path, 'base = "q4_k"\nbasse = 1\n')
    with pytest.raises(ConvertError, match=r"line 2: unknown key 'basse'"):
        profiles.load(path)


def test_a_users_profile_file_extends_a_shipped_one(tmp_path):
    path = write_profile(tmp_path, 'extends = "q4_k_m"\n[[rule]]\ntensors = "ffn_up"\ntype = "q8_0"\nreason = "mine"\n')
    profile = profiles.load(path)
    assert profile.choose(planned("blk.1.ffn_up.weight", (512, 256)), facts()).type == T.Q8_0
    assert profile.choose(planned("blk.2.attn_qkv.weight", (512, 256)), facts()).type == T.Q6_K  # inherited


def test_dry_run_prints_the_plan_and_writes_nothing(ckpt, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(ckpt), "-q", "q4_k_m", "-q", "q8_0", "-o", str(tmp_path / "out"), "--dry-run", "--no-mmproj"])
    assert result.exit_code == 0, result.output
    assert "blk.0.attn_qkv.weight" in result.output and "Q6_K" in result.output
    assert result.output.count("total ") == 2
    assert not (tmp_path / "out").exists()


def test_dry_run_sizes_are_the_written_sizes(ckpt, tmp_path):
    conversion = Conversion(ckpt, ["q4_k_m-hybrid"], tmp_path / "o.gguf", mmproj=None)
    planned_size = conversion.outputs[0].file.size
    (out,) = conversion.run(threads=1)
    assert out.size == planned_size


def test_info_shows_the_profile(ckpt, tmp_path):
    Conversion(ckpt, ["edge-arm"], tmp_path / "o.gguf").run(threads=1)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "o.gguf")])
    assert result.exit_code == 0, result.output
    assert re.search(r"^\s*profile\W+edge-arm\s*$", result.output, re.M), result.output


def test_the_profiles_command_lists_every_shipped_profile():
    result = CliRunner().invoke(main, ["profiles"])
    assert result.exit_code == 0, result.output
    listed = dict(line.split(None, 1) for line in result.output.splitlines())
    shipped = sorted(p.stem for p in profiles.PROFILE_DIR.glob("*.toml"))
    assert sorted(listed) == shipped and "q4_k_m-hybrid" in listed and "edge-arm" in listed
    assert all(listed[name].strip() == profiles.load(name).description for name in shipped)


def test_imatrix_types_need_an_imatrix(ckpt, tmp_path):
    with pytest.raises(ConvertError, match="iq2_xxs needs an importance matrix.*--imatrix"):
        Conversion(ckpt, ["iq2_xxs"], tmp_path / "o.gguf")
    assert not list(tmp_path.iterdir())


def write_imatrix(path, entries):
    tensors, data = [], []
    for name, sums in entries.items():
        sums = np.asarray(sums, np.float32)
        tensors += [TensorSpec(f"{name}.in_sum2", sums.shape, T.F32), TensorSpec(f"{name}.counts", (sums.shape[0],), T.F32)]
        data += [sums, np.ones(sums.shape[0], np.float32)]
    f = GGUFFile(path, [("general.type", "string", "imatrix")], tensors).open()
    for d in data:
        f.write(d)
    f.finish()
    return path


def test_an_imatrix_of_another_model_is_refused(ckpt, tmp_path):
    other = write_imatrix(tmp_path / "other.gguf", {"blk.0.attn_qkv.weight": np.ones((1, 1024))})
    with pytest.raises(ConvertError, match=r"does not match the model: blk.0.attn_qkv.weight has importance for 1×1024 values"):
        Conversion(ckpt, ["q4_k_m"], tmp_path / "o.gguf", imatrix=other)
    unrelated = write_imatrix(tmp_path / "unrelated.gguf", {"model.layers.0.mlp.weight": np.ones((1, 256))})
    with pytest.raises(ConvertError, match="none of its entries names a tensor of this model"):
        Conversion(ckpt, ["q4_k_m"], tmp_path / "o.gguf", imatrix=unrelated)


def test_an_imatrix_changes_the_quantized_bytes(ckpt, tmp_path):
    header = read_header(Conversion(ckpt, ["f32"], tmp_path / "f32.gguf").run()[0].path)
    weights = {t.name: np.random.default_rng(1).uniform(0.1, 5, (1, t.shape[-1]))
               for t in header.tensors if len(t.shape) == 2 and t.name.endswith(".weight")}
    imatrix = write_imatrix(tmp_path / "imatrix.gguf", weights)
    plain = Conversion(ckpt, ["q4_k_m"], tmp_path / "plain.gguf", mmproj=None).run(threads=1)[0].path
    weighted = Conversion(ckpt, ["q4_k_m"], tmp_path / "weighted.gguf", imatrix=imatrix, mmproj=None).run(threads=1)[0].path
    assert plain.read_bytes() != weighted.read_bytes()
