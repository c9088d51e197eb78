"""Reading a Hugging Face checkpoint directory: config, safetensors headers, tensor rows.

Tensor data is read with plain positioned reads into fresh buffers, never through an mmap:
pages touched through an mmap count toward peak RSS until unmapped, while read() leaves
them in the page cache, where they do not.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConvertError

# numpy has no bfloat16: BF16 data travels as its raw uint16 bits until it is widened.
_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name: F32, F16 or BF16
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def row_length(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1


def load_config(checkpoint_dir: Path) -> dict:
    """config.json with `text_config` merged over the root, as the releases nest it."""
    path = checkpoint_dir / "config.json"
    root = _read_json(path, required=True)
    text = root.get("text_config") or {}
    if not isinstance(text, dict):
        raise ConvertError(f"{path}: text_config is not an object")
    return {**root, **text}


def _read_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise ConvertError(f"{path} not found")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path} does not hold a JSON object")
    return value


def read_json(path: Path) -> dict:
    """An optional JSON object file: {} when absent, a clear error when malformed."""
    return _read_json(path)


class Checkpoint:
    """The tensors of a checkpoint directory, by name, across all its safetensors files."""

    def __init__(self, checkpoint_dir: Path):
        self.dir = checkpoint_dir
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        for path in _weight_files(checkpoint_dir):
            for info in _read_header(path):
                if info.name in self.tensors:
                    raise ConvertError(f"tensor {info.name} appears twice ({self.tensors[info.name].path.name}, {path.name})")
                self.tensors[info.name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor seen as 2-D (rows, row_length), in its stored dtype."""
        info = self.tensors[name]
        dtype = _DTYPES[info.dtype]
        row_bytes = info.row_length * dtype.itemsize
        out = np.empty((stop - start, info.row_length), dtype=dtype)
        view = memoryview(out).cast("B")
        fd = self._fds.get(info.path)
        if fd is None:
            fd = self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        offset = info.offset + start * row_bytes
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise ConvertError(f"{info.path.name}: file ends inside tensor {name} (truncated download?)")
            done += n
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _weight_files(checkpoint_dir: Path) -> list[Path]:
    index_path = checkpoint_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (checkpoint_dir / f).is_file()]
        if missing:
            raise ConvertError(f"shard {missing[0]} listed in {index_path.name} is missing from {checkpoint_dir}")
        return [checkpoint_dir / f for f in files]
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConvertError(f"no model.safetensors or model.safetensors.index.json in {checkpoint_dir}")


def _read_header(path: Path) -> list[TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConvertError(f"{path.name} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ConvertError(f"{path.name} is not a valid safetensors file (corrupt header length)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConvertError(f"{path.name} is not a valid safetensors file (corrupt header)") from None
    data_start = 8 + header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path.name}: malformed header entry for {name}") from None
        if dtype not in _DTYPES:
            raise ConvertError(f"{path.name}: tensor {name} has dtype {dtype}; supported: BF16, F16, F32")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise ConvertError(f"{path.name}: tensor {name} holds {end - begin} bytes, its shape {list(shape)} needs {nbytes}")
        if data_start + end > size:
            raise ConvertError(f"{path.name} is truncated: tensor {name} ends past the end of the file")
        infos.append(TensorInfo(name, dtype, shape, path, data_start + begin, nbytes))
    return infos
