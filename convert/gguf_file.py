"""GGUF v3 files: a streaming writer (header first, then tensor data chunk by chunk, byte counts
checked) and a fast header reader.

States: OPEN (header written, expecting tensor data in declared order) → DONE (renamed into place)
or ABORTED (temporary file removed). The file is written under a temporary name next to the target
and renamed only once every declared byte is in it, so no half-written GGUF ever carries the name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

ALIGNMENT = 32
_MAGIC = 0x46554747  # "GGUF" little-endian
_VERSION = 3

# GGUF value types.
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9
_SCALARS = {"u32": (_UINT32, "<I"), "i32": (_INT32, "<i"), "f32": (_FLOAT32, "<f"), "bool": (_BOOL, "<?")}
# Every scalar value type, by code, as a struct format (for reading).
_READ_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    n = int(np.prod(shape, dtype=np.int64))
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of {ggml_type.name}'s block of {block}")
    return n // block * type_size


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(kind: str, value) -> bytes:
    if kind == "string":
        return struct.pack("<I", _STRING) + _string(value)
    if kind in _SCALARS:
        code, fmt = _SCALARS[kind]
        return struct.pack("<I", code) + struct.pack(fmt, value)
    if kind.endswith("[]"):
        item = kind[:-2]
        head = struct.pack("<I", _ARRAY)
        if item == "string":
            return head + struct.pack("<IQ", _STRING, len(value)) + b"".join(_string(s) for s in value)
        code, fmt = _SCALARS[item]
        return head + struct.pack("<IQ", code, len(value)) + np.asarray(value, dtype=np.dtype(fmt)).tobytes()
    raise ValueError(f"unknown metadata type {kind}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


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
        parts = [struct.pack("<IIQQ", _MAGIC, _VERSION, len(self.tensors), len(metadata))]
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


class GGUFFormatError(ValueError):
    """The bytes are not a complete, well-formed GGUF file."""


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array (e.g. 248k tokens), summarised instead of decoded."""

    item_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A tensor as a file lists it: its spec and where its data starts."""

    offset: int  # absolute


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict
    tensors: list[TensorInfo]
    file_size: int


def read_header(path: Path, keep_arrays_up_to: int = 4096) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file, checked against the file's size.

    Arrays longer than keep_arrays_up_to are returned as ArrayInfo: decoding a 248k-token vocabulary
    element by element is what makes general-purpose readers slow.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = 16 << 20
        while True:  # the header's size is unknown until parsed: read more until it fits
            f.seek(0)
            buf = f.read(min(size, prefix))
            try:
                reader, metadata, infos = _parse(buf, keep_arrays_up_to)
                break
            except _NeedMore:
                if len(buf) >= size:
                    raise GGUFFormatError("truncated header") from None
                prefix *= 4
    alignment = int(metadata.get("general.alignment", ALIGNMENT))
    data_start = reader.pos + (-reader.pos % alignment)
    tensors = [TensorInfo(n, shape, t, data_start + off) for n, shape, t, off in infos]
    for t in tensors:
        if t.offset + t.nbytes > size:
            raise GGUFFormatError(f"truncated: tensor {t.name} ends past the end of the file")
    return GGUFHeader(metadata, tensors, size)


def _parse(buf: bytes, keep_arrays_up_to: int):
    reader = _Cursor(buf)
    magic, version, n_tensors, n_kv = reader.unpack("<IIQQ")
    if magic != _MAGIC:
        raise GGUFFormatError("not a GGUF file")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported")
    metadata = {}
    for _ in range(n_kv):
        key = reader.string()
        (kind,) = reader.unpack("<I")
        metadata[key] = reader.value(kind, keep_arrays_up_to)
    infos = []
    for _ in range(n_tensors):
        name = reader.string()
        (n_dims,) = reader.unpack("<I")
        dims = reader.unpack(f"<{n_dims}Q")
        type_code, offset = reader.unpack("<IQ")
        try:
            ggml_type = GGMLQuantizationType(type_code)
        except ValueError:
            raise GGUFFormatError(f"tensor {name} has unknown type {type_code}") from None
        infos.append((name, tuple(reversed(dims)), ggml_type, offset))
    return reader, metadata, infos


class _NeedMore(Exception):
    """Parsing ran past the bytes read so far."""


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise _NeedMore
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise _NeedMore
        s = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, kind: int, keep_arrays_up_to: int):
        if kind == _STRING:
            return self.string()
        if kind in _READ_FORMATS:
            return self.unpack(_READ_FORMATS[kind])[0]
        if kind != _ARRAY:
            raise GGUFFormatError(f"unknown metadata type {kind}")
        item, count = self.unpack("<IQ")
        if item == _STRING:
            if count > keep_arrays_up_to:
                for _ in range(count):  # skip: only the lengths are read
                    (n,) = self.unpack("<Q")
                    self.pos += n
                return ArrayInfo(item, count)
            return [self.string() for _ in range(count)]
        if item not in _READ_FORMATS:
            raise GGUFFormatError(f"unknown array item type {item}")
        fmt = _READ_FORMATS[item]
        nbytes = struct.calcsize(fmt) * count
        if self.pos + nbytes > len(self.buf):
            raise _NeedMore
        if count > keep_arrays_up_to:
            self.pos += nbytes
            return ArrayInfo(item, count)
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
        self.pos += nbytes
        return values
