"""Quantization in llama.cpp's own kernels: `ggml_quantize_chunk` from the ggml library that
llama-cpp-python ships, called through ctypes from worker threads (ctypes releases the GIL).

The same function llama-quantize calls, so the bytes are the ones llama-quantize would write.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..system import physical_cores
from .errors import ConvertError


@lru_cache(maxsize=1)
def _ggml():
    try:
        import llama_cpp  # only for where its libraries are
        from llama_cpp._ctypes_extensions import load_shared_library
    except ImportError:
        raise ConvertError("quantizing needs llama-cpp-python==0.3.36 (pip install llama-cpp-python==0.3.36)") from None
    lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    return lib


class Quantizer:
    """Quantizes float32 row blocks, splitting the rows across threads."""

    def __init__(self, threads: int | None = None):
        # Physical cores: the kernels gain nothing from hyper-threads.
        self.threads = max(1, threads or physical_cores())
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._lib = _ggml()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def quantize(self, rows: np.ndarray, ggml_type: GGMLQuantizationType, imatrix: np.ndarray | None = None,
                 first_row: int = 0, rows_per_expert: int = 0) -> np.ndarray:
        """rows: float32 [n, n_per_row], rows first_row.. of a tensor seen as 2-D.

        imatrix: importance of each column, [n_per_row], or [n_experts, n_per_row] for an expert
        tensor whose experts are rows_per_expert rows each.
        """
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n, n_per_row = rows.shape
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        row_bytes = n_per_row // block * type_size
        out = np.empty(n * row_bytes, dtype=np.uint8)
        self._lib.ggml_quantize_init(int(ggml_type))  # once, before threads race to do it
        per_expert = imatrix is not None and imatrix.ndim == 2

        def work(start: int, stop: int) -> None:
            weights = None
            if imatrix is not None:
                weights = imatrix[(first_row + start) // rows_per_expert] if per_expert else imatrix
                weights = np.ascontiguousarray(weights, dtype=np.float32)
            self._lib.ggml_quantize_chunk(
                int(ggml_type), rows[start].ctypes.data, out[start * row_bytes:].ctypes.data, 0,
                stop - start, n_per_row, weights.ctypes.data if weights is not None else None,
            )

        spans = _spans(n, self.threads, first_row, rows_per_expert if per_expert else 0)
        if self._pool is None or len(spans) == 1:
            for span in spans:
                work(*span)
        else:
            for future in [self._pool.submit(work, *span) for span in spans]:
                future.result()
        return out


def _spans(n: int, threads: int, first_row: int, rows_per_expert: int) -> list[tuple[int, int]]:
    """Row ranges for the threads; ggml takes one importance vector per call, so a range never
    spans two experts."""
    step = max(1, -(-n // threads))
    cuts = set(range(0, n, step)) | {n}
    if rows_per_expert:
        first_boundary = -first_row % rows_per_expert
        cuts |= set(range(first_boundary, n, rows_per_expert))
    cuts = sorted(cuts)
    return list(zip(cuts[:-1], cuts[1:]))
