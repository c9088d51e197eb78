"""Profiles that claim to reproduce llama-quantize do: same type for every tensor, same bytes.

Each tiny checkpoint is converted to F32 by qwen35; llama.cpp's own llama_model_quantize (through
llama-cpp-python) quantizes that F32 file; qwen35 converts the checkpoint straight to the profile.
Both runs get the same importance matrix, so the imatrix-only types (IQ1/IQ2/IQ3_XXS) are covered too.
"""

import ctypes
import json
import re
from pathlib import Path

import numpy as np
import pytest

from qwen35.convert import ConvertError, profiles, qwen35
from qwen35.convert.gguf_file import GGUFFile, TensorSpec
from qwen35.gguf_header import read_header
from qwen35.convert.pipeline import Conversion
from qwen35.demo.synthetic import write_checkpoint
from qwen35.models.fit import HeaderOnlyCheckpoint
from tests.test_plan_snapshots import RELEASES
from tests.tiny import RELEASE_CONFIGS, byte_level_tokenizer, gguf_contents, tiny_config

llama_cpp = pytest.importorskip("llama_cpp")
from llama_cpp import _logger as llama_logger  # noqa: E402  (to restore its log callback)

# Rows of 256 so the K-quants apply without fallbacks; 8 layers + MTP so use_more_bits() varies.
SHAPES = dict(hidden_size=256, num_hidden_layers=8, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
              head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64, vocab_size=512)
FIXTURES = {
    "dense-tied-gqa4": tiny_config(num_attention_heads=4, num_key_value_heads=1, intermediate_size=512, **SHAPES),
    "dense-untied-gqa2": tiny_config(num_attention_heads=2, num_key_value_heads=1, intermediate_size=512,
                                     tie_word_embeddings=False, **SHAPES),
    "moe-gqa2": tiny_config(moe=True, num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=256,
                            shared_expert_intermediate_size=256, **SHAPES),
}
FIXTURES["dense-untied-gqa2"]["tie_word_embeddings"] = False
LLAMA_PROFILES = [name for name in profiles.available()
                  if profiles.tomllib.loads((profiles.PROFILE_DIR / f"{name}.toml").read_text()).get("matches_llama_quantize")]


@pytest.fixture(scope="module", params=list(FIXTURES))
def model(request, tmp_path_factory):
    """(checkpoint, its F32 GGUF, an imatrix GGUF, the same importance as llama_model_quantize takes it)."""
    work = tmp_path_factory.mktemp(request.param)
    ckpt = write_checkpoint(work / "ckpt", FIXTURES[request.param], seed=3)
    byte_level_tokenizer(ckpt)
    f32 = work / "f32.gguf"
    Conversion(ckpt, ["f32"], f32).run()
    imatrix_path, importance = write_imatrix(f32, work / "imatrix.gguf")
    return ckpt, f32, imatrix_path, importance


def write_imatrix(f32_gguf, path):
    """A random importance matrix in llama.cpp's imatrix GGUF layout, for every 2-D/3-D weight."""
    rng = np.random.default_rng(7)
    tensors, data, importance = [], [], {}
    for t in read_header(f32_gguf).tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            continue
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        sums = rng.uniform(0.1, 4.0, size=(n_mat, t.shape[-1])).astype(np.float32)
        counts = rng.integers(1, 50, size=n_mat).astype(np.float32)
        tensors += [TensorSpec(f"{t.name}.in_sum2", sums.shape, profiles.T.F32), TensorSpec(f"{t.name}.counts", counts.shape, profiles.T.F32)]
        data += [sums, counts]
        importance[t.name] = (sums / counts[:, None]).astype(np.float32).reshape(-1)
    meta = [("general.type", "string", "imatrix"), ("imatrix.datasets", "string[]", ["random"]),
            ("imatrix.chunk_count", "u32", 1), ("imatrix.chunk_size", "u32", 512)]
    f = GGUFFile(path, meta, tensors).open()
    for d in data:
        f.write(d)
    f.finish()
    return path, importance


def llama_quantize(f32_gguf, out, profile_name, importance, dry_run=False) -> tuple[bool, str]:
    """Run llama_model_quantize; (succeeded, what it logged)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{profile_name.upper()}")
    params.nthread = 2
    params.dry_run = dry_run
    if importance is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        names = [name.encode() for name in importance]
        for entry, name, values in zip(entries, names, importance.values()):
            entry.name = name
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    log = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        log.append(text.decode("utf-8", "replace") if text else "")

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        ok = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(out).encode(), ctypes.byref(params)) == 0
    finally:
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    return ok, "".join(log)


# A dry run logs each tensor as "[  3/ 91] blk.0.attn_qkv.weight - [ 256, 512, ...], type = f32, size = … -> … (q6_K)".
_DRY_RUN_LINE = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\w+)\))?")


def llama_types(log: str) -> dict[str, str]:
    return {m.group(1): (m.group(3) or m.group(2)).upper() for m in _DRY_RUN_LINE.finditer(log)}


@pytest.mark.parametrize("with_imatrix", [True, False], ids=["imatrix", "no-imatrix"])
@pytest.mark.parametrize("profile_name", LLAMA_PROFILES)
def test_profile_picks_the_types_llama_quantize_picks(model, profile_name, with_imatrix, tmp_path):
    ckpt, f32, imatrix_path, importance = model
    llama_ok, log = llama_quantize(f32, tmp_path / "llama.gguf", profile_name, importance if with_imatrix else None, dry_run=True)
    theirs = llama_types(log)
    assert theirs, "no per-tensor lines in llama.cpp's dry-run log"
    try:
        conversion = Conversion(ckpt, [profile_name], tmp_path / "ours.gguf", imatrix=imatrix_path if with_imatrix else None)
    except ConvertError as e:
        assert "needs an importance matrix" in str(e)
        assert "will require an imatrix" in log or "requires an imatrix" in log, "qwen35 asked for an imatrix that llama-quantize does without"
        return
    conversion.ckpt.close()
    (out,) = conversion.outputs
    ours = {t.name: c.type.name for t, c in zip(conversion.tensors, out.choices)}
    assert ours == theirs


# Bytes are compared on a spread of kernels (the types above already pin every tensor's type);
# the 2-bit IQ kernel (imatrix-only) is slow enough to run on the dense fixture only.
BYTE_CHECKED = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k", "iq4_xs", "iq3_s"]
SLOW_KERNELS = ["iq2_xxs"]


@pytest.mark.parametrize("profile_name", BYTE_CHECKED + SLOW_KERNELS)
def test_quantized_bytes_equal_llama_quantize(model, profile_name, tmp_path, request):
    if profile_name in SLOW_KERNELS and "dense-tied" not in request.node.callspec.id:
        pytest.skip("slow kernel: checked on the dense fixture")
    ckpt, f32, imatrix_path, importance = model
    theirs_path, ours_path = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    ok, log = llama_quantize(f32, theirs_path, profile_name, importance)
    assert ok, log[-500:]
    Conversion(ckpt, [profile_name], ours_path, imatrix=imatrix_path).run(threads=2)
    their_meta, theirs = gguf_contents(theirs_path)
    our_meta, ours = gguf_contents(ours_path)
    assert our_meta["general.file_type"] == their_meta["general.file_type"]
    assert {n: t.name for n, (_, t, _) in ours.items()} == {n: t.name for n, (_, t, _) in theirs.items()}
    differing = [n for n in ours if ours[n][2] != theirs[n][2]]
    assert not differing, f"{len(differing)} tensors differ in bytes, e.g. {differing[:3]}"


@pytest.fixture(scope="module", params=RELEASES)
def release(request, tmp_path_factory):
    """A sparse BF16 GGUF of a real release (header, then a hole the size of the data): llama.cpp's dry
    run reads names, shapes and hyper-parameters only. Also our plan for it, from the config alone."""
    config = json.loads((RELEASE_CONFIGS / f"{request.param}.json").read_text())
    h = qwen35.read_hparams({**config, **config.get("text_config", {})})
    tensors = qwen35.plan_tensors(HeaderOnlyCheckpoint(config), h, mtp=True)
    facts = qwen35.model_facts(h, tensors)
    bf16 = profiles.load("bf16")
    specs = [TensorSpec(t.name, t.shape, bf16.choose(t, facts).type) for t in tensors]
    header = GGUFFile(Path("unused"), qwen35.metadata(h, tensors), specs)
    path = tmp_path_factory.mktemp("sparse") / f"{request.param}.gguf"
    with open(path, "wb") as f:
        f.write(header.header)
        f.truncate(header.size)
    return path, tensors, facts


@pytest.mark.parametrize("profile_name", LLAMA_PROFILES)
def test_release_plan_matches_llama_quantize(release, profile_name, tmp_path):
    path, tensors, facts = release
    _, log = llama_quantize(path, tmp_path / "unused.gguf", profile_name, None, dry_run=True)
    theirs = llama_types(log)
    assert len(theirs) == len(tensors), log[-500:]
    profile = profiles.load(profile_name)
    assert {t.name: profile.choose(t, facts).type.name for t in tensors} == theirs
