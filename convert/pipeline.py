"""`qwen35 convert`: checkpoint reader → tensor plan → transforms → encode → GGUF writers.

One tensor at a time, in row chunks of bounded size, and every requested output type fed from the same
read: memory does not grow with the model.
"""

from __future__ import annotations

import errno
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import qwen35
from .checkpoint import Checkpoint, load_config
from .dtypes import FILE_TYPES, Chunk, parse_output_type, tensor_type
from .errors import ConvertError
from .gguf_file import GGUFFile, TensorSpec
from .plan import PlannedTensor
from .tokenizer import license_of, sampling_metadata, tokenizer_metadata

CHUNK_BYTES = 16 * 1024 * 1024  # raw checkpoint bytes per read


@dataclass(frozen=True)
class Output:
    type_name: str
    path: Path
    size: int
    seconds: float


def convert(checkpoint_dir, qtypes=("bf16",), output=None, *, mtp=True, force=False, progress=None) -> list[Output]:
    """Convert a Qwen3.5 checkpoint directory to one GGUF per requested type."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ConvertError(f"checkpoint directory {checkpoint_dir} does not exist")
    types = {name.lower(): parse_output_type(name) for name in qtypes}  # dict: each type once, in order
    if not types:
        raise ConvertError("no output type given")
    config = load_config(checkpoint_dir)
    h = qwen35.read_hparams(config)
    start = time.monotonic()

    with Checkpoint(checkpoint_dir) as ckpt:
        tensors, _left_out = qwen35.plan_tensors(ckpt, h, mtp=mtp)
        n_vocab = tensors[0].shape[0]  # token_embd rows: the tokenizer is padded to match
        name = model_name(checkpoint_dir, config)
        common = (
            qwen35.metadata(h, tensors)
            + general_metadata(checkpoint_dir, name, qwen35.size_label(tensors, h))
            + tokenizer_metadata(checkpoint_dir, n_vocab)
            + sampling_metadata(checkpoint_dir)
        )
        paths = output_paths(output, name, list(types), force)
        files = []
        for (type_name, ggml_type), path in zip(types.items(), paths):
            specs = [TensorSpec(t.name, t.shape, tensor_type(t, ggml_type)) for t in tensors]
            meta = common + [
                ("general.file_type", "u32", FILE_TYPES[ggml_type]),
                ("general.quantization_version", "u32", 2),
            ]
            files.append(GGUFFile(path, meta, specs))
        check_space(files)

        with ExitStack() as stack:
            for f in files:
                f.open()
                stack.callback(f.abort)  # no-op once finished
            write_tensors(ckpt, tensors, files, progress)
            done = [f.finish() for f in files]
    seconds = time.monotonic() - start
    return [Output(t, p, p.stat().st_size, seconds) for t, p in zip(types, done)]


def write_tensors(ckpt: Checkpoint, tensors: list[PlannedTensor], files: list[GGUFFile], progress) -> None:
    total = sum(t.n_elements for t in tensors)
    done = 0
    try:
        for i, t in enumerate(tensors):
            types = [f.tensors[i].ggml_type for f in files]
            for raw in read_chunks(ckpt, t):
                chunk = Chunk(raw, t)
                for f, ggml_type in zip(files, types):
                    f.write(chunk.encode(ggml_type))
                done += raw.size
                if progress:
                    progress(done, total, t.name)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"no space left on device while writing {files[0].path.parent}") from None
        raise


def read_chunks(ckpt: Checkpoint, t: PlannedTensor) -> Iterator[np.ndarray]:
    """The tensor's rows in output order, in chunks of about CHUNK_BYTES, merging small runs."""
    itemsize = 4 if t.source_dtype == "F32" else 2
    max_rows = max(1, CHUNK_BYTES // (t.row_length * itemsize))
    pending: list[np.ndarray] = []
    pending_rows = 0
    for source in t.sources:
        for start, stop in source.runs:
            while start < stop:
                n = min(stop - start, max_rows - pending_rows)
                pending.append(ckpt.read_rows(source.tensor, start, start + n))
                pending_rows += n
                start += n
                if pending_rows == max_rows:
                    yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                    pending, pending_rows = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def model_name(checkpoint_dir: Path, config: dict) -> str:
    name = config.get("_name_or_path") or checkpoint_dir.resolve().name
    return str(name).rstrip("/").split("/")[-1]


def general_metadata(checkpoint_dir: Path, name: str, size: str) -> list[tuple[str, str, object]]:
    kv = [("general.type", "string", "model"), ("general.name", "string", name), ("general.size_label", "string", size)]
    license_name = license_of(checkpoint_dir)
    if license_name:
        kv.append(("general.license", "string", license_name))
    return kv


def output_paths(output, name: str, type_names: list[str], force: bool) -> list[Path]:
    """`-o` is a file for one type and a directory for several; default names <model>-<TYPE>.gguf."""
    default = [f"{name}-{t.upper()}.gguf" for t in type_names]
    if output is None:
        paths = [Path(n) for n in default]
    else:
        output = Path(output)
        if len(type_names) == 1 and not output.is_dir():
            paths = [output]
        else:
            if output.exists() and not output.is_dir():
                raise ConvertError(f"{output} is a file; several types need -o to name a directory")
            output.mkdir(parents=True, exist_ok=True)
            paths = [output / n for n in default]
    for p in paths:
        if not p.parent.is_dir():
            raise ConvertError(f"output directory {p.parent} does not exist")
        if p.exists() and not force:
            raise ConvertError(f"{p} already exists (use --force to overwrite)")
    return paths


def check_space(files: list[GGUFFile]) -> None:
    by_dir: dict[Path, int] = {}
    for f in files:
        by_dir[f.path.parent] = by_dir.get(f.path.parent, 0) + f.size
    for directory, need in by_dir.items():
        free = shutil.disk_usage(directory).free
        if need > free:
            raise ConvertError(f"not enough space in {directory}: the output needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


def terminal_progress(stream=sys.stderr):
    """A one-line progress bar when `stream` is a terminal, else None (quiet in pipes and logs)."""
    if not stream.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int, name: str) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and done < total:
            return
        last[0] = now
        width = 30
        filled = int(width * done / total)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * done / total:5.1f}%  {name[:40]:<40}")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show
