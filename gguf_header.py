"""Reading GGUF headers: the one reader that `qwen35 info`, the converter's checks and the runtime share.

A header is the file's metadata (key → value) and its tensor table (name, shape, type, offset). It is
read straight from the mapped file with `struct`, and checked against the file's size, so a
truncated download or a file that is not GGUF becomes one sentence instead of a llama.cpp abort.

Why not gguf-py's `GGUFReader` (the PyPI `gguf` package, which we use for its constants): it builds
a numpy view for every part of every field, so the 248,320-entry token list, its scores, types and
the ~247k merges become about a million small arrays. The issue that asked for this module (#8)
measured ~0.17 s for our reader on a Qwen3.5-0.8B GGUF against 13 s and 1.2 GB for `GGUFReader`;
`bench/bench_gguf_read.py` measures both side by side on a file with those dimensions. Long arrays are
summarised here (`ArrayInfo`: item type and length), never decoded, since nothing we do needs the
vocabulary in Python. (The writer, `convert/gguf_file.py`, says why we do not use `GGUFWriter`.)
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

ALIGNMENT = 32  # general.alignment's default
MAGIC = b"GGUF"
VERSION = 3  # what we write; versions 2 and 3 are read, as llama.cpp does

# GGUF value types (the format's numbering).
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
# Every fixed-size value type, by code, as a struct format.
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# Arrays longer than this (the 248k-token vocabulary, its scores, types and merges) are summarised.
KEEP_ARRAYS_UP_TO = 4096

_TRUNCATED_HEADER = "is truncated: its header ends early (incomplete download or copy?)"


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    n = int(np.prod(shape, dtype=np.int64))
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of {ggml_type.name}'s block of {block}")
    return n // block * type_size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first); the file lists ggml order, reversed
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A tensor as a file lists it: its spec and where its data starts."""

    offset: int  # absolute, in bytes from the start of the file


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array, summarised instead of decoded."""

    item_type: int
    count: int


class GGUFFormatError(ValueError):
    """The file is missing, not GGUF, or not complete. The message starts with the path and is one
    sentence, ready for a front end's error line."""


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    metadata: dict  # key -> int | float | bool | str | list (short arrays) | ArrayInfo (long ones)
    tensors: list[TensorInfo]
    file_size: int

    def array_length(self, key: str) -> int:
        """Length of a metadata array (0 when absent), whether it was decoded or summarised."""
        value = self.metadata.get(key)
        if isinstance(value, ArrayInfo):
            return value.count
        return len(value) if isinstance(value, list) else 0


def read_header(path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file, checked against the file's size."""
    path = Path(path)
    if not path.exists():
        raise GGUFFormatError(f"{path} does not exist")
    if not path.is_file():
        raise GGUFFormatError(f"{path} is not a file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) != MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _header(buf, path, size)


def read_header_prefix(data: bytes, path, file_size: int) -> GGUFHeader:
    """The header of a GGUF of `file_size` bytes from its first bytes alone (a file not downloaded
    yet: its start fetched with a range request). When `data` ends inside the header, the
    GGUFFormatError says it is truncated (HEADER_TRUNCATED in its message): fetch more."""
    path = Path(path)
    if data[:4] != MAGIC:
        raise GGUFFormatError(f"{path} is not a GGUF file")
    return _header(data, path, file_size)


HEADER_TRUNCATED = _TRUNCATED_HEADER


def _header(buf, path: Path, size: int) -> GGUFHeader:
    cursor = _Cursor(buf, path)
    metadata, infos = _parse(cursor)
    data_start = cursor.pos
    alignment = int(metadata.get("general.alignment", ALIGNMENT))
    data_start += -data_start % alignment
    tensors = [TensorInfo(name, shape, t, data_start + offset) for name, shape, t, offset in infos]
    data_end = max((t.offset + t.nbytes for t in tensors), default=data_start)
    if data_end > size:
        raise GGUFFormatError(f"{path} is truncated: {size:,} bytes, but its tensors need {data_end:,} "
                              "(incomplete download or copy?)")
    return GGUFHeader(path, metadata, tensors, size)


def _parse(r: "_Cursor"):
    r.pos = 4
    (version,) = r.unpack("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"{r.path} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    n_tensors, n_kv = r.unpack("<QQ")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        (kind,) = r.unpack("<I")
        metadata[key] = r.value(kind)
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        (n_dims,) = r.unpack("<I")
        dims = r.unpack(f"<{n_dims}Q")
        type_code, offset = r.unpack("<IQ")
        try:
            ggml_type = GGMLQuantizationType(type_code)
        except ValueError:
            raise GGUFFormatError(f"{r.path} has a tensor ({name}) of unknown type {type_code} "
                                  "(a GGUF newer than llama-cpp-python 0.3.36's llama.cpp?)") from None
        infos.append((name, tuple(reversed(dims)), ggml_type, offset))
    return metadata, infos


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"{self.path} {_TRUNCATED_HEADER}")

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self._need(n)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        self._need(n)
        s = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[kind])[0]
        if kind != ARRAY:
            raise GGUFFormatError(f"{self.path} is not a valid GGUF file (unknown value type {kind})")
        item, count = self.unpack("<IQ")
        if item == STRING:
            if count <= KEEP_ARRAYS_UP_TO:
                return [self.string() for _ in range(count)]
            for _ in range(count):  # skipped: only the lengths are read
                (n,) = self.unpack("<Q")
                self.pos += n
            self._need(0)
            return ArrayInfo(item, count)
        if item not in SCALAR_FORMATS:
            raise GGUFFormatError(f"{self.path} is not a valid GGUF file (unknown array item type {item})")
        fmt = SCALAR_FORMATS[item]
        nbytes = struct.calcsize(fmt) * count
        self._need(nbytes)
        if count > KEEP_ARRAYS_UP_TO:
            self.pos += nbytes
            return ArrayInfo(item, count)
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
        self.pos += nbytes
        return values
