"""What `qwen35 run` needs to know about a GGUF before handing it to llama.cpp.

Reading the header ourselves turns the usual failures into one clear sentence — a missing file, a
file that is not GGUF, a truncated download, a model of another architecture — where llama.cpp would
print "failed to load model" (or abort). The same header gives the sizes for the memory estimate,
the chat template and the recommended sampling.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ChatError

# Architectures this runtime is built for; others run with a warning if llama.cpp knows them.
QWEN35_ARCHS = ("qwen35", "qwen35moe")

# GGUF value types (gguf spec): fixed-size scalars, then STRING = 8 and ARRAY = 9.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this (the 248k-token vocabulary and its merges) are counted, not read.
_MAX_ARRAY_READ = 4096


@dataclass(frozen=True)
class TensorEntry:
    offset: int  # in the file
    nbytes: int
    type_name: str  # GGML type: Q4_0, Q8_0, F32, …
    dims: tuple[int, ...]  # ggml order: row length first, then rows (then experts)


@dataclass
class ModelFile:
    path: Path
    size: int
    metadata: dict = field(repr=False)
    tensors: dict[str, TensorEntry] = field(repr=False)
    array_lengths: dict[str, int] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def n_tokens(self) -> int:
        return self.array_lengths.get("tokenizer.ggml.tokens", 0)

    def sampling_defaults(self) -> dict:
        """The recommended sampling written by the converter (llama.cpp's general.sampling.* keys)."""
        names = {"temp": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repeat_penalty"}
        found = {ours: self.metadata.get(f"general.sampling.{key}") for key, ours in names.items()}
        # Stored as float32: 0.6 reads back as 0.6000000238.
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in found.items() if v is not None}


class _Reader:
    def __init__(self, buf, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise ChatError(f"{self.path} is truncated: its header ends early (incomplete download or copy?)") from None
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise ChatError(f"{self.path} is truncated: its header ends early (incomplete download or copy?)")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.unpack("Q")
        self.pos += n

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.unpack("IQ")
            if n > _MAX_ARRAY_READ:
                self._skip_array(item_type, n)
                return _LongArray(n)
            return [self.value(item_type) for _ in range(n)]
        raise ChatError(f"{self.path} is not a valid GGUF file (unknown value type {vtype})")

    def _skip_array(self, item_type: int, n: int) -> None:
        if item_type in _SCALARS:
            self.pos += n * struct.calcsize(_SCALARS[item_type])
        elif item_type == _STRING:
            for _ in range(n):
                self.skip_string()
        else:
            for _ in range(n):
                self.value(item_type)


@dataclass(frozen=True)
class _LongArray:
    length: int


def read_model_file(path) -> ModelFile:
    path = Path(path)
    if not path.exists():
        raise ChatError(f"{path} does not exist")
    if not path.is_file():
        raise ChatError(f"{path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ChatError(f"{path} is not a GGUF file (convert a checkpoint with `qwen35 convert`)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path, size)


def _parse(buf, path: Path, size: int) -> ModelFile:
    r = _Reader(buf, path)
    r.pos = 4
    version = r.unpack("I")
    if version not in (2, 3):
        raise ChatError(f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    n_tensors, n_kv = r.unpack("QQ")
    metadata, array_lengths = {}, {}
    for _ in range(n_kv):
        key = r.string()
        value = r.value(r.unpack("I"))
        if isinstance(value, _LongArray):
            array_lengths[key] = value.length
        else:
            if isinstance(value, list):
                array_lengths[key] = len(value)
            metadata[key] = value

    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("I")
        dims = [r.unpack("Q") for _ in range(n_dims)]
        ggml_type, offset = r.unpack("IQ")
        infos.append((name, dims, ggml_type, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-r.pos // alignment) * alignment

    tensors, data_end = {}, data_start
    for name, dims, ggml_type, offset in infos:
        nbytes = _tensor_bytes(dims, ggml_type, path)
        tensors[name] = TensorEntry(data_start + offset, nbytes, GGMLQuantizationType(ggml_type).name, tuple(dims))
        data_end = max(data_end, data_start + offset + nbytes)
    if data_end > size:
        raise ChatError(f"{path} is truncated: {size:,} bytes, but its tensors need {data_end:,} "
                        f"(incomplete download or copy?)")
    return ModelFile(path, size, metadata, tensors, array_lengths)


def _tensor_bytes(dims: list[int], ggml_type: int, path: Path) -> int:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ChatError(f"{path} has a tensor of unknown type {ggml_type} "
                        f"(a GGUF newer than llama-cpp-python 0.3.36's llama.cpp?)") from None
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size
