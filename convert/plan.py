"""The tensor plan: what each GGUF tensor is made of, known before a byte of data is read.

A plan is built from config.json and the safetensors headers alone, so the GGUF header (which lists
every tensor's shape and type up front) can be written first and the data streamed after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np


@dataclass(frozen=True)
class Source:
    """Rows of one checkpoint tensor (seen as 2-D), as [start, stop) runs in output order."""

    tensor: str
    runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows first)
    source_dtype: str  # safetensors dtype of every source: BF16, F16 or F32
    sources: tuple[Source, ...]
    values: Optional[Callable[[np.ndarray], np.ndarray]] = None  # float32 → float32, applied once
    columns: Optional[np.ndarray] = field(default=None)  # column permutation, applied to every row

    @property
    def row_length(self) -> int:
        return self.shape[-1]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))
