"""Writing GGUF v3 files: header first, then tensor data chunk by chunk, byte counts checked.

States: OPEN (header written, expecting tensor data in declared order) → DONE (renamed into place)
or ABORTED (temporary file removed). The file is written under a temporary name next to the target
and renamed only once every declared byte is in it, so no half-written GGUF ever carries the name.

Why not gguf-py's `GGUFWriter`: it takes each tensor as one whole array (`write_tensor_data`), so a
multi-gigabyte expert tensor of a MoE release would sit in memory at once, and it opens the target
name itself, so an interrupted conversion leaves a half-written file under the final name. Reading
is in ../gguf_header.py (which says why not `GGUFReader`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..gguf_header import ALIGNMENT, ARRAY, BOOL, FLOAT32, INT32, MAGIC, STRING, UINT32, VERSION, TensorSpec

# Scalar metadata kinds the writer takes, as (GGUF value type, struct format).
_SCALARS = {"u32": (UINT32, "<I"), "i32": (INT32, "<i"), "f32": (FLOAT32, "<f"), "bool": (BOOL, "<?")}


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(kind: str, value) -> bytes:
    if kind == "string":
        return struct.pack("<I", STRING) + _string(value)
    if kind in _SCALARS:
        code, fmt = _SCALARS[kind]
        return struct.pack("<I", code) + struct.pack(fmt, value)
    if kind.endswith("[]"):
        item = kind[:-2]
        head = struct.pack("<I", ARRAY)
        if item == "string":
            return head + struct.pack("<IQ", STRING, len(value)) + b"".join(_string(s) for s in value)
        code, fmt = _SCALARS[item]
        return head + struct.pack("<IQ", code, len(value)) + np.asarray(value, dtype=np.dtype(fmt)).tobytes()
    raise ValueError(f"unknown metadata type {kind}")


class GGUFFile:
    def __init__(self, path: Path, metadata: list[tuple[str, str, object]], tensors: list[TensorSpec]):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.partial")
        self.tensors = tensors
        self.header = self._encode_header(metadata)  # public: a test writes headers of sparse files
        self._data_sizes = [t.nbytes for t in tensors]
        self.size = len(self.header) + sum(n + _pad(n) for n in self._data_sizes)
        self._file = None
        self._index = 0  # tensor being written
        self._written = 0  # its bytes so far
        self.state = "NEW"

    def _encode_header(self, metadata) -> bytes:
        parts = [MAGIC + struct.pack("<IQQ", VERSION, len(self.tensors), len(metadata))]
        parts += [_string(key) + _value(kind, value) for key, kind, value in metadata]
        offset = 0
        for t in self.tensors:
            dims = tuple(reversed(t.shape))  # ggml lists the fastest-varying dimension first
            parts.append(_string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, int(t.ggml_type), offset))
            offset += t.nbytes + _pad(t.nbytes)
        header = b"".join(parts)
        return header + b"\0" * _pad(len(header))

    def open(self) -> "GGUFFile":
        assert self.state == "NEW", self.state
        self._file = open(self.tmp_path, "wb")
        self.state = "OPEN"
        self._file.write(self.header)
        self._skip_finished()
        return self

    def write(self, data: np.ndarray) -> None:
        """Append bytes of the current tensor; a tensor's last chunk moves on to the next."""
        assert self.state == "OPEN", self.state
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        if self._index >= len(self.tensors) or self._written + len(buf) > self._data_sizes[self._index]:
            name = self.tensors[min(self._index, len(self.tensors) - 1)].name
            raise RuntimeError(f"more data than declared for tensor {name}")
        self._file.write(buf)
        self._written += len(buf)
        self._skip_finished()

    def _skip_finished(self) -> None:
        while self._index < len(self.tensors) and self._written == self._data_sizes[self._index]:
            self._file.write(b"\0" * _pad(self._written))
            self._index += 1
            self._written = 0

    def finish(self) -> Path:
        assert self.state == "OPEN", self.state
        if self._index != len(self.tensors):
            raise RuntimeError(f"tensor {self.tensors[self._index].name} is incomplete")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._file.tell() != self.size:
            raise RuntimeError(f"wrote {self._file.tell()} bytes, expected {self.size}")
        self._file.close()
        os.replace(self.tmp_path, self.path)
        self.state = "DONE"
        return self.path

    def abort(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.state != "DONE":
            self.tmp_path.unlink(missing_ok=True)
            self.state = "ABORTED"
