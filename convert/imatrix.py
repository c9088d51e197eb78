"""Importance matrices in llama.cpp's imatrix GGUF format (what `llama-imatrix` writes).

Each weight W has `W.in_sum2` ([n_matrices, row_length] sums of squared activations) and `W.counts`
([n_matrices] how many activations were summed); importance = in_sum2 / counts, or 1 where a
matrix (an expert) saw no tokens — as llama-quantize reads it (tools/quantize/quantize.cpp).
Entries are read when their tensor is quantized, so a 397B-A17B imatrix is never all in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .errors import ConvertError
from ..gguf_header import GGUFFormatError, TensorInfo, read_header


class Imatrix:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"imatrix file {self.path} does not exist")
        try:
            header = read_header(self.path)
        except GGUFFormatError as e:
            raise ConvertError(f"imatrix: {e}") from None
        self._sums: dict[str, TensorInfo] = {}
        self._counts: dict[str, TensorInfo] = {}
        for t in header.tensors:
            if t.ggml_type != GGMLQuantizationType.F32:
                raise ConvertError(f"{self.path}: imatrix tensor {t.name} is {t.ggml_type.name}, expected F32")
            if t.name.endswith(".in_sum2"):
                self._sums[t.name[: -len(".in_sum2")]] = t
            elif t.name.endswith(".counts"):
                self._counts[t.name[: -len(".counts")]] = t
        if not self._sums:
            raise ConvertError(f"{self.path} holds no imatrix entries (*.in_sum2 tensors)")
        self.names = frozenset(self._sums)  # the weights it has importance for
        self.datasets = header.metadata.get("imatrix.datasets", [])

    def check(self, name: str, row_length: int, n_matrices: int) -> None:
        """A clear error when the entry for `name` cannot belong to a tensor of this shape."""
        sums = self._sums[name]
        rows, length = (sums.shape if len(sums.shape) == 2 else (1, sums.shape[-1]))
        if length != row_length or rows not in (1, n_matrices):
            raise ConvertError(
                f"imatrix {self.path.name} does not match the model: {name} has importance for "
                f"{rows}×{length} values, the tensor has {n_matrices}×{row_length}")

    def get(self, name: str) -> np.ndarray | None:
        """[n_matrices, row_length] float32 importance, or None when the file has no entry."""
        sums_info = self._sums.get(name)
        if sums_info is None:
            return None
        sums = _read(self.path, sums_info).reshape(-1, sums_info.shape[-1])
        counts_info = self._counts.get(name)
        counts = _read(self.path, counts_info).reshape(-1) if counts_info else np.ones(len(sums), np.float32)
        out = np.ones_like(sums)
        seen = counts > 0
        out[seen] = sums[seen] / counts[seen, None]
        return out


def _read(path: Path, info: TensorInfo) -> np.ndarray:
    return np.fromfile(path, dtype=np.float32, count=info.nbytes // 4, offset=info.offset)
