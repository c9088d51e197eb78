"""Which weights llama.cpp repacks (CPU_REPACK), and what the memory estimate counts for them.

The predicate is checked on hand-made tensor lists against the rules of the pinned llama.cpp
(ggml-cpu/repack.cpp), and on this machine against the CPU_REPACK buffer llama.cpp itself reports
when it loads a file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen35.runtime.engine.memory import estimate, maps_weights, weight_bytes
from gguf.constants import GGMLQuantizationType

from qwen35.gguf_header import TensorInfo
from qwen35.runtime.engine.modelfile import ModelFile
from qwen35.runtime.engine.cpu import parse_features
from qwen35.runtime.engine.repack import AMX_IN_USE, AMX_LAYOUT, copy_bytes, repacked, repacked_layout

# What llama_print_system_info() printed for the three builds (x86: this machine; ARM: the
# cross-built library under qemu, tests/arm/).
X86_AVX512 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
              "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
              "REPACK = 1 | ")
A76 = frozenset(parse_features("CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"))
A72 = frozenset(parse_features("CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"))
I8MM = A76 | {"MATMUL_INT8"}
GRAVITON3 = I8MM | {"SVE", "SVE_CNT=32"}
AVX2 = frozenset({"AVX", "AVX2", "FMA", "REPACK"})
X86 = frozenset(parse_features(X86_AVX512))


def test_parse_features():
    assert {"AVX2", "AVX512", "REPACK", "OPENMP"} <= X86 and "NEON" not in X86
    assert parse_features("CPU : NEON = 1 | SVE = 1 | SVE_CNT = 32 | REPACK = 1 |") == ["NEON", "SVE", "SVE_CNT=32",
                                                                                        "REPACK"]


@pytest.mark.parametrize("features, type_name, rows, layout", [
    (A76, "Q4_0", 256, "q4_0_4x4"), (I8MM, "Q4_0", 256, "q4_0_4x8"), (GRAVITON3, "Q4_0", 256, "q4_0_8x8"),
    (GRAVITON3, "Q4_0", 4, "q4_0_4x8"),  # 8x8 needs rows of 8: falls through to the next choice
    (A72, "Q4_0", 256, None),  # no dotprod: plain NEON kernels
    (AVX2, "Q4_0", 256, "q4_0_8x8"), (AVX2, "Q4_0", 12, None),
    (A76, "Q8_0", 256, "q8_0_4x4"), (I8MM, "Q8_0", 256, "q8_0_4x8"), (AVX2, "Q8_0", 256, None),
    (A76, "Q8_0", 6, None),
    (A76, "Q4_K", 256, "q4_K_8x4"), (I8MM, "Q4_K", 256, "q4_K_8x8"), (AVX2, "Q4_K", 256, "q4_K_8x8"),
    (A76, "Q4_K", 4, None),
    (A76, "Q5_K", 256, "q5_K_8x4"), (AVX2, "Q5_K", 256, None),
    (A76, "Q6_K", 256, "q6_K_8x4"), (AVX2, "Q6_K", 256, None),
    (AVX2, "Q2_K", 256, None), (X86, "Q2_K", 256, "q2_K_8x8"), (A76, "Q2_K", 256, None),
    (A76, "IQ4_NL", 256, "iq4_nl_4x4"), (AVX2, "IQ4_NL", 256, "iq4_nl_8x8"),
    (A76, "Q3_K", 256, None), (A76, "Q4_1", 256, None), (A76, "IQ4_XS", 256, None), (A76, "F16", 256, None),
    (A76 - {"REPACK"}, "Q4_0", 256, None),  # built without GGML_CPU_REPACK
])
def test_repacked_layout(features, type_name, rows, layout):
    assert repacked_layout(features, type_name, (1024, rows)) == layout


def test_only_matrix_multiplication_weights_repack():
    assert repacked(A76, "blk.0.ffn_up.weight", "Q4_0", (1024, 3584)) == "q4_0_4x4"
    assert repacked(A76, "blk.0.ffn_up_exps.weight", "Q4_0", (1024, 512, 256)) == "q4_0_4x4"  # MUL_MAT_ID
    assert repacked(A76, "token_embd.weight", "Q8_0", (1024, 248320)) is None  # GET_ROWS
    assert repacked(A76, "output.weight", "Q8_0", (1024, 248320)) == "q8_0_4x4"
    assert repacked(A76, "blk.0.attn_norm.weight", "Q8_0", (1024,)) is None


def _model_file(tensors: dict[str, tuple[str, tuple[int, ...], int]], **arch) -> ModelFile:
    """Tensors given as name -> (type, ggml dims, the bytes that makes, as a check of the numbers)."""
    meta = {"general.architecture": "qwen35", **{f"qwen35.{k}": v for k, v in arch.items()}}
    infos = [TensorInfo(name, tuple(reversed(dims)), GGMLQuantizationType[type_name], 0)
             for name, (type_name, dims, _) in tensors.items()]
    assert [t.nbytes for t in infos] == [nbytes for _, _, nbytes in tensors.values()]
    return ModelFile(Path("hand-made.gguf"), 0, meta, infos, 1000)


EMBD = ("Q8_0", (128, 1000), 136_000)
UP = ("Q4_0", (128, 512), 36_864)
NORM = ("F32", (128,), 512)
MTP_UP = ("Q4_0", (128, 512), 36_864)


def test_tied_embedding_is_held_twice_where_it_repacks():
    mf = _model_file({"token_embd.weight": EMBD, "blk.0.ffn_up.weight": UP, "blk.0.attn_norm.weight": NORM,
                      "blk.1.ffn_up.weight": MTP_UP}, block_count=2, nextn_predict_layers=1)
    # A76: the ffn weight is repacked (its mapped original idle), and the tied output projection is a
    # second, repacked copy of the embedding; the MTP block's weight is not loaded at all.
    assert weight_bytes(mf, A76) == (136_000 + 36_864 + 512, 36_864 + 136_000, 36_864)
    # Pi 4: nothing repacks; the output projection reads the embedding's mapping.
    assert weight_bytes(mf, A72) == (136_000 + 36_864 + 512, 0, 0)
    # x86 AVX2: Q4_0 repacks, Q8_0 does not.
    assert weight_bytes(mf, AVX2) == (136_000 + 36_864 + 512, 36_864, 36_864)


def test_untied_output_is_repacked_once():
    mf = _model_file({"token_embd.weight": EMBD, "output.weight": EMBD, "blk.0.ffn_up.weight": UP},
                     block_count=1)
    assert weight_bytes(mf, A76) == (2 * 136_000 + 36_864, 136_000 + 36_864, 136_000 + 36_864)


def test_estimate_counts_repacked_copies_but_fits_without_the_idle_originals():
    mf = _model_file({"token_embd.weight": EMBD, "blk.0.ffn_up.weight": UP}, block_count=1)
    plain = estimate(mf, 256, n_batch=64, n_checkpoints=1, threads=1, features=A72, process=0)
    packed = estimate(mf, 256, n_batch=64, n_checkpoints=1, threads=1, features=A76, process=0)
    assert packed.total - plain.total == 36_864 + 136_000
    assert packed.needed - plain.needed == 136_000  # the embedding's second copy stays; the ffn original does not


def test_a_file_mostly_copied_is_read_not_mapped():
    assert maps_weights(172_864, 36_864) and maps_weights(101, 50) and not maps_weights(100, 50)
    ups = {f"blk.{i}.ffn_up.weight": UP for i in range(4)}
    mf = _model_file({"token_embd.weight": EMBD, **ups}, block_count=4)
    # A76: the four Q4_0 weights (147,456 of 283,456 bytes) are only read to be repacked: the file
    # is read, so their originals are never held; the tied output's copy of the embedding stays.
    read = estimate(mf, 256, n_batch=64, n_checkpoints=1, threads=1, features=A76, process=0)
    assert not read.mapped
    assert (read.weights, read.repacked, read.weights_idle) == (136_000, 4 * 36_864 + 136_000, 0)
    # Pi 4: nothing is copied, the file is mapped.
    mapped = estimate(mf, 256, n_batch=64, n_checkpoints=1, threads=1, features=A72, process=0)
    assert mapped.mapped and (mapped.weights, mapped.repacked) == (136_000 + 4 * 36_864, 0)
    # What must fit is the same either way: the idle originals were never counted in it.
    assert read.needed - mapped.needed == 136_000


# --- AMX (where runtime.cpu lets it run) ---------------------------------------------------------

XEON_AMX = X86 | {AMX_IN_USE}


def test_amx_takes_matrix_weights_of_its_types_and_shapes_before_cpu_repack():
    assert repacked(XEON_AMX, "blk.0.ffn_up.weight", "Q4_0", (1024, 3584)) == AMX_LAYOUT  # (AVX2 would repack it)
    assert repacked(X86, "blk.0.ffn_up.weight", "Q4_0", (1024, 3584)) == "q4_0_8x8"  # AMX not in use
    assert repacked(XEON_AMX, "blk.0.ssm_beta.weight", "Q8_0", (1024, 16)) is None  # 16 rows: not two tiles
    assert repacked(XEON_AMX, "blk.0.ffn_up.weight", "Q4_K", (1024, 3592)) == "q4_K_8x8"  # 3592 rows: CPU_REPACK's
    assert repacked(XEON_AMX, "blk.0.ffn_up.weight", "Q6_K", (1024, 3592)) is None  # (which has no x86 Q6_K layout)
    assert repacked(XEON_AMX, "blk.0.ffn_up.weight", "Q8_0", (1088, 3584)) == AMX_LAYOUT  # 32-aligned is enough
    assert repacked(XEON_AMX, "blk.0.ffn_up_exps.weight", "Q4_0", (1024, 512, 8)) == "q4_0_8x8"  # MUL_MAT_ID: not AMX
    assert repacked(XEON_AMX, "blk.0.ffn_up.weight", "Q3_K", (1024, 3584)) is None
    assert repacked(XEON_AMX, "token_embd.weight", "Q8_0", (1024, 248320)) is None  # GET_ROWS
    assert repacked(XEON_AMX, "output.weight", "Q8_0", (1024, 248320)) == AMX_LAYOUT


@pytest.mark.parametrize("type_name, dims, nbytes, copy", [
    ("Q8_0", (1024, 64), 64 * 32 * 34, 64 * 32 * (34 + 4)),  # + an int32 compensation a block
    ("Q4_0", (1024, 64), 64 * 32 * 18, 64 * 32 * 18),
    ("Q4_K", (1024, 64), 64 * 4 * 144, 64 * 4 * (144 + 4)),
    ("Q6_K", (1024, 64), 64 * 4 * 210, 64 * 4 * 210),
    ("IQ4_XS", (1024, 64), 64 * 4 * 136, 64 * 4 * (136 + 2)),
])
def test_an_amx_copy_carries_its_extra_bytes_a_block(type_name, dims, nbytes, copy):
    assert copy_bytes(AMX_LAYOUT, type_name, dims, nbytes) == copy
    assert copy_bytes("q4_0_8x8", type_name, dims, nbytes) == nbytes  # CPU_REPACK: the same blocks


def test_the_estimate_counts_the_amx_copy_and_its_idle_original():
    mf = _model_file({"token_embd.weight": EMBD, "blk.0.ffn_up.weight": UP, "blk.0.attn_norm.weight": NORM},
                     block_count=1)
    # The Q4_0 weight goes to AMX (same size); the tied output projection's 1000 rows are not a
    # multiple of 32, so it reads the embedding's mapping.
    assert weight_bytes(mf, XEON_AMX) == (136_000 + 36_864 + 512, 36_864, 36_864)
    mf = _model_file({"token_embd.weight": ("Q8_0", (128, 1024), 139_264), "blk.0.ffn_up.weight": UP},
                     block_count=1)
    # 1024 rows: the tied output projection is an AMX copy of the embedding, 4 bytes more a block.
    assert weight_bytes(mf, XEON_AMX) == (139_264 + 36_864, 36_864 + 139_264 + 4 * 4 * 1024, 36_864)
