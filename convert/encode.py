"""Checkpoint rows → the bytes of a GGUF tensor type.

Float types are converted in numpy (BF16 → BF16 moves the bits untouched); quantized types go through
llama.cpp's own kernels (native_quant.py).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from gguf import GGMLQuantizationType

from .plan import PlannedTensor

T = GGMLQuantizationType
_SAME_BITS = {("BF16", T.BF16), ("F16", T.F16), ("F32", T.F32)}


class Chunk:
    """Rows [first_row, first_row + n) of one planned tensor as read; widened to float32 (with the
    tensor's value transform) at most once, however many outputs take it."""

    def __init__(self, raw: np.ndarray, tensor: PlannedTensor, first_row: int):
        self.tensor = tensor
        self.first_row = first_row
        self.raw = raw if tensor.columns is None else raw[:, tensor.columns]

    @cached_property
    def f32(self) -> np.ndarray:
        if self.tensor.source_dtype == "BF16":
            x = (self.raw.astype(np.uint32) << 16).view(np.float32)
        else:
            x = self.raw.astype(np.float32)
        return self.tensor.values(x) if self.tensor.values else x

    def encode(self, ggml_type: GGMLQuantizationType, quantizer=None, importance: np.ndarray | None = None) -> np.ndarray:
        if self.tensor.values is None and (self.tensor.source_dtype, ggml_type) in _SAME_BITS:
            return self.raw
        if ggml_type == T.F32:
            return self.f32
        if ggml_type == T.F16:
            return self.f32.astype(np.float16)
        if ggml_type == T.BF16:
            return bf16_bits(self.f32)
        rows_per_matrix = self.tensor.n_elements // self.tensor.row_length // len(importance) if importance is not None else 0
        return quantizer.quantize(self.f32, ggml_type, importance, self.first_row, rows_per_matrix)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits, rounding to nearest even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)
