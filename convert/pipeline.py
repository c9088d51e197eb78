"""`qwen35 convert`: checkpoint reader → tensor plan → transforms → encode → GGUF writers.

One tensor at a time, in row chunks of bounded size, and every requested output type fed from the same
read: memory does not grow with the model.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType as T

from . import profiles, qwen35, qwen35_vision
from .checkpoint import Checkpoint, load_config
from .encode import Chunk
from .errors import ConvertError
from .gguf_file import GGUFFile, TensorSpec
from .imatrix import Imatrix
from .plan import PlannedTensor
from .profiles import Choice, Profile
from .tokenizer import license_of, sampling_metadata, tokenizer_metadata

CHUNK_BYTES = 16 * 1024 * 1024  # raw checkpoint bytes per read
_FLOAT_TYPES = {T.F32, T.F16, T.BF16}


@dataclass(frozen=True)
class Output:
    type_name: str
    path: Path
    size: int
    seconds: float


@dataclass
class OutputPlan:
    profile: Profile
    choices: list[Choice]
    file: GGUFFile  # holds the output path


@dataclass
class MmprojPlan:
    """The vision tower's file, written from the same read as the text GGUFs."""

    type_name: str  # --mmproj-type
    tensors: list[PlannedTensor]
    choices: list[Choice]
    file: GGUFFile


class Conversion:
    """Everything decided before any weight is read: from config.json and the safetensors headers."""

    def __init__(self, checkpoint_dir, qtypes=("bf16",), output=None, *, mtp=True, force=False, imatrix=None,
                 dry_run=False, mmproj: str | None = "f16", name: str | None = None):
        """`name`: the model's name (general.name, and the output files'); default: config.json's
        _name_or_path, else the directory's name (a download's directory is named for a commit)."""
        self.started = time.monotonic()  # the summary line counts planning (tokenizer parsing) too
        self.checkpoint_dir = Path(checkpoint_dir)
        if not self.checkpoint_dir.is_dir():
            problem = "is not a directory" if self.checkpoint_dir.exists() else "does not exist"
            raise ConvertError(f"checkpoint directory {self.checkpoint_dir} {problem}")
        if not qtypes:
            raise ConvertError("no output type given")
        chosen = {}
        for q in qtypes:  # each profile once, in the order given
            profile = profiles.load(q)
            chosen.setdefault(profile.name, profile)
        config = load_config(self.checkpoint_dir)
        h = qwen35.read_hparams(config)
        self.ckpt = Checkpoint(self.checkpoint_dir)
        try:
            self.tensors = qwen35.plan_tensors(self.ckpt, h, mtp=mtp)
            self.imatrix = Imatrix(imatrix) if imatrix else None
            facts = qwen35.model_facts(h, self.tensors, imatrix=self.imatrix is not None)
            name = name or model_name(self.checkpoint_dir, config)
            common = (
                qwen35.metadata(h, self.tensors)
                + general_metadata(self.checkpoint_dir, name, qwen35.size_label(self.tensors, h))
                + tokenizer_metadata(self.checkpoint_dir, self.tensors[0].shape[0])  # padded to token_embd's rows
                + sampling_metadata(self.checkpoint_dir)
            )
            paths = output_paths(output, name, list(chosen), force and not dry_run, check_existing=not dry_run)
            self.outputs = []
            for profile, path in zip(chosen.values(), paths):
                choices = [profile.choose(t, facts) for t in self.tensors]
                self._check_imatrix(profile, choices)
                meta = common + [
                    ("general.file_type", "u32", profile.file_type),
                    ("general.quantization_version", "u32", 2),
                    ("general.quantization.profile", "string", profile.name),
                ]
                specs = [TensorSpec(t.name, t.shape, c.type) for t, c in zip(self.tensors, choices)]
                self.outputs.append(OutputPlan(profile, choices, GGUFFile(path, meta, specs)))
            self.mmproj = None
            if mmproj is not None and qwen35_vision.has_vision_tower(config, self.ckpt):
                self.mmproj = self._plan_mmproj(config, name, mmproj, paths[0].parent, force and not dry_run,
                                                check_existing=not dry_run)
        except BaseException:
            self.ckpt.close()
            raise

    def _plan_mmproj(self, config: dict, name: str, type_name: str, directory: Path, force: bool,
                     check_existing: bool) -> MmprojPlan:
        if type_name not in qwen35_vision.MMPROJ_TYPES:
            raise ConvertError(f"unknown mmproj type {type_name}; choose from {', '.join(qwen35_vision.MMPROJ_TYPES)}")
        h = qwen35_vision.read_vision_hparams(config)
        tensors = qwen35_vision.plan_tensors(self.ckpt, h)
        mean, std = qwen35_vision.image_normalization(self.checkpoint_dir)
        choices = [Choice(*qwen35_vision.choose_type(t, type_name)) for t in tensors]
        meta = (qwen35_vision.metadata(h, type_name, mean, std)
                + general_metadata(self.checkpoint_dir, name, qwen35_vision.size_label(tensors), kind="mmproj"))
        path = directory / mmproj_file_name(name, type_name)
        if check_existing and path.exists() and not force:
            raise ConvertError(f"{path} already exists (use --force to overwrite, or --no-mmproj)")
        specs = [TensorSpec(t.name, t.shape, c.type) for t, c in zip(tensors, choices)]
        return MmprojPlan(type_name, tensors, choices, GGUFFile(path, meta, specs))

    def _files(self) -> list[GGUFFile]:
        return [out.file for out in self.outputs] + ([self.mmproj.file] if self.mmproj else [])

    def _check_imatrix(self, profile: Profile, choices: list[Choice]) -> None:
        quantized = [(t, c) for t, c in zip(self.tensors, choices) if c.type not in _FLOAT_TYPES]
        if self.imatrix is not None:
            ours = {t.name for t, _ in quantized}
            if not ours & self.imatrix.names:
                raise ConvertError(f"imatrix {self.imatrix.path.name} does not match the model: none of its entries names a tensor of this model")
            for t, _ in quantized:
                if t.name in self.imatrix.names:
                    self.imatrix.check(t.name, t.row_length, t.shape[0] if len(t.shape) == 3 else 1)
        if profile.imatrix_required and self.imatrix is None:
            raise ConvertError(f"{profile.name} needs an importance matrix: pass --imatrix FILE (llama.cpp's imatrix GGUF)")
        needing = [t.name for t, c in quantized if c.type in profiles.IMATRIX_TYPES
                   and (self.imatrix is None or t.name not in self.imatrix.names)]
        if needing:
            if self.imatrix is None:
                raise ConvertError(f"{profile.name} needs an importance matrix ({len(needing)} tensors use types that "
                                   "cannot be made without one): pass --imatrix FILE (llama.cpp's imatrix GGUF)")
            raise ConvertError(f"imatrix {self.imatrix.path.name} has no entry for {needing[0]}, which {profile.name} quantizes to a type that needs one")

    def describe_plan(self) -> str:
        lines = []
        for out in self.outputs:
            lines.append(f"{out.file.path}  ({out.profile.name}: {out.profile.description})")
            for t, c, spec in zip(self.tensors, out.choices, out.file.tensors):
                shape = "×".join(str(d) for d in t.shape)
                lines.append(f"  {t.name:<40} {shape:>18}  {c.type.name:<7} {spec.nbytes:>14,}  {c.reason}")
            lines.append(f"  total {out.file.size:,} bytes ({out.file.size / 1e6:,.1f} MB)")
        if self.mmproj:
            m = self.mmproj
            lines.append(f"{m.file.path}  (mmproj {m.type_name}: the vision tower, for llama.cpp's mtmd)")
            for t, c, spec in zip(m.tensors, m.choices, m.file.tensors):
                shape = "×".join(str(d) for d in t.shape)
                lines.append(f"  {t.name:<40} {shape:>18}  {c.type.name:<7} {spec.nbytes:>14,}  {c.reason}")
            lines.append(f"  total {m.file.size:,} bytes ({m.file.size / 1e6:,.1f} MB)")
        return "\n".join(lines)

    def run(self, threads: int | None = None, progress=None) -> list[Output]:
        quantizer = None
        try:
            all_choices = [c for out in self.outputs for c in out.choices] + (self.mmproj.choices if self.mmproj else [])
            if any(c.type not in _FLOAT_TYPES for c in all_choices):
                from .native_quant import Quantizer

                quantizer = Quantizer(threads)
            files = self._files()
            check_space(files)
            with ExitStack() as stack:
                for f in files:
                    f.open()
                    stack.callback(f.abort)  # no-op once finished
                self._write_tensors(quantizer, progress)
                done = [f.finish() for f in files]
        finally:
            self.ckpt.close()
            if quantizer is not None:
                quantizer.close()
        seconds = time.monotonic() - self.started
        names = [out.profile.name for out in self.outputs] + ([f"mmproj-{self.mmproj.type_name}"] if self.mmproj else [])
        return [Output(n, p, p.stat().st_size, seconds) for n, p in zip(names, done)]

    def _write_tensors(self, quantizer, progress) -> None:
        mmproj = self.mmproj.tensors if self.mmproj else []
        total = sum(t.n_elements for t in self.tensors + mmproj)
        done = 0
        try:
            for i, t in enumerate(self.tensors):
                types = [out.choices[i].type for out in self.outputs]
                importance = None
                if self.imatrix is not None and any(ty not in _FLOAT_TYPES for ty in types):
                    importance = self.imatrix.get(t.name)
                row = 0
                for raw in read_chunks(self.ckpt, t):
                    chunk = Chunk(raw, t, row)
                    for out, ggml_type in zip(self.outputs, types):
                        out.file.write(chunk.encode(ggml_type, quantizer, importance))
                    row += len(raw)
                    done += raw.size
                    if progress:
                        progress(done, total, t.name)
            for t, c in zip(mmproj, self.mmproj.choices if self.mmproj else []):
                row = 0
                for raw in read_chunks(self.ckpt, t):
                    self.mmproj.file.write(Chunk(raw, t, row).encode(c.type, quantizer))
                    row += len(raw)
                    done += raw.size
                    if progress:
                        progress(done, total, t.name)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ConvertError(f"no space left on device while writing {self.outputs[0].file.path.parent}") from None
            raise


def convert(checkpoint_dir, qtypes=("bf16",), output=None, *, mtp=True, force=False, imatrix=None, threads=None,
            progress=None, mmproj: str | None = "f16") -> list[Output]:
    """Convert a Qwen3.5 checkpoint directory to one GGUF per requested type or profile, and its
    vision tower (if any) to `<name>-mmproj-<TYPE>.gguf` beside them (mmproj=None: not)."""
    return Conversion(checkpoint_dir, qtypes, output, mtp=mtp, force=force, imatrix=imatrix,
                      mmproj=mmproj).run(threads, progress)


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


def general_metadata(checkpoint_dir: Path, name: str, size: str, kind: str = "model") -> list[tuple[str, str, object]]:
    kv = [("general.type", "string", kind), ("general.name", "string", name), ("general.size_label", "string", size)]
    license_name = license_of(checkpoint_dir)
    if license_name:
        kv.append(("general.license", "string", license_name))
    return kv


def mmproj_file_name(name: str, type_name: str) -> str:
    """What `qwen35 run` looks for beside a model whose general.name is `name`."""
    return f"{name}-mmproj-{type_name.upper()}.gguf"


def output_paths(output, name: str, type_names: list[str], force: bool, check_existing: bool = True) -> list[Path]:
    """`-o` is a file for one type and a directory for several; default names <model>-<TYPE>.gguf."""
    default = [f"{name}-{t.upper()}.gguf" for t in type_names]
    if output is None:
        paths = [Path(n) for n in default]
    else:
        names_a_directory = str(output).endswith(("/", os.sep)) or Path(output).is_dir()
        output = Path(output)
        if len(type_names) == 1 and not names_a_directory:
            paths = [output]
        else:
            if output.exists() and not output.is_dir():
                raise ConvertError(f"{output} is a file; several types need -o to name a directory")
            if check_existing:  # a dry run creates nothing
                output.mkdir(parents=True, exist_ok=True)
            paths = [output / n for n in default]
    for p in paths:
        if check_existing and not p.parent.is_dir():
            raise ConvertError(f"output directory {p.parent} does not exist")
        if check_existing and p.exists() and not force:
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
