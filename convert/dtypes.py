"""The one place that decides each tensor's GGUF type, and turns checkpoint data into those bytes."""

from __future__ import annotations

from functools import cached_property

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from .errors import ConvertError
from .plan import PlannedTensor

T = GGMLQuantizationType
OUTPUT_TYPES = {"f32": T.F32, "bf16": T.BF16, "f16": T.F16, "q8_0": T.Q8_0}
# general.file_type (llama_ftype) of a file whose big tensors have that type.
FILE_TYPES = {T.F32: 0, T.F16: 1, T.Q8_0: 7, T.BF16: 32}
# 2-D tensors llama.cpp needs in F32 at every type: the CPU conv kernel aborts on a quantized
# ssm_conv1d, and routers decide which experts run, so they keep full precision.
KEEP_F32 = ("ssm_conv1d.weight", "ffn_gate_inp.weight")


def parse_output_type(name: str) -> GGMLQuantizationType:
    try:
        return OUTPUT_TYPES[name.lower()]
    except KeyError:
        raise ConvertError(f"unknown type {name!r}; choose from {', '.join(OUTPUT_TYPES)}") from None


def tensor_type(t: PlannedTensor, requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type a tensor gets in a file of the requested type."""
    if len(t.shape) == 1 or t.name.endswith(KEEP_F32):
        return T.F32
    block, _ = GGML_QUANT_SIZES[requested]
    if t.row_length % block:
        return T.F16  # rows that do not split into the type's blocks, as llama.cpp falls back
    return requested


class Chunk:
    """Rows of one planned tensor as read, widened to float32 (with its value transform) at most once."""

    def __init__(self, raw: np.ndarray, tensor: PlannedTensor):
        self.tensor = tensor
        self.raw = raw if tensor.columns is None else raw[:, tensor.columns]

    @cached_property
    def f32(self) -> np.ndarray:
        dtype = self.tensor.source_dtype
        if dtype == "BF16":
            x = (self.raw.astype(np.uint32) << 16).view(np.float32)
        else:
            x = self.raw.astype(np.float32)
        return self.tensor.values(x) if self.tensor.values else x

    def encode(self, ggml_type: GGMLQuantizationType) -> np.ndarray:
        untouched = self.tensor.values is None
        if untouched and (self.tensor.source_dtype, ggml_type) in (("BF16", T.BF16), ("F16", T.F16), ("F32", T.F32)):
            return self.raw  # same bits in and out
        if ggml_type == T.F32:
            return self.f32
        if ggml_type == T.F16:
            return self.f32.astype(np.float16)
        if ggml_type == T.BF16:
            return bf16_bits(self.f32)
        return quants.quantize(self.f32, ggml_type)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits, rounding to nearest even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)
