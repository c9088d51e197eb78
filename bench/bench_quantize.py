#!/usr/bin/env python3
"""Benchmarks HF → quantized GGUF: one `qwen35 convert` against llama.cpp's two-step pipeline.

    python bench/bench_quantize.py [--workdir DIR] [--runs N] [--config CONFIG.json] [--layers N]

The reference pipeline is what a Qwen3.5 user runs today: llama.cpp's converter (from the
llama-cpp-python 0.3.36 sdist) to BF16, then llama.cpp's quantizer to Q4_K_M (`llama_model_quantize`,
the function behind the `llama-quantize` binary, from the same llama-cpp-python build qwen35 uses,
with its default thread count). Against it, three qwen35 commands:

  A. `qwen35 convert CKPT -q q4_k_m`                     (target: ≤ 0.6× the pipeline's wall time)
  B. `qwen35 convert CKPT -q bf16 -q q8_0 -q q4_k_m`      (target: < the pipeline's wall time)

Every command runs under `/usr/bin/time -v`, in turn, so machine drift hits all alike; the pipeline's
wall time is the sum of its two steps and its peak RSS the larger of the two. Prints a markdown table
with medians and ratios. Shares the checkpoint, sdist and reference venv with bench_convert.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench_convert import (DEFAULT_CONFIG, Measurement, bench_config, ensure_checkpoint, ensure_reference,
                           qwen35_tool, source_version, timed)

QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a Qwen3.5 config.json")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers of the config")
    args = parser.parse_args()

    name = args.config.name.removesuffix(".json").removesuffix(".config.RECONSTRUCTED").removesuffix(".config")
    if args.layers is not None:
        name += f"-{args.layers}layers"
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(args.workdir, bench_config(args.config, args.layers), name)
    reference_python, llama_cpp = ensure_reference(args.workdir)
    qwen35 = qwen35_tool().command(ckpt, "q4_k_m", Path("unused"))[0]
    out = args.workdir / f"quant-{name}"
    out.mkdir(exist_ok=True)

    results: dict[str, list[Measurement]] = {"pipeline": [], "pipeline: convert bf16": [], "pipeline: quantize q4_k_m": [],
                                             "A: qwen35 q4_k_m": [], "B: qwen35 bf16+q8_0+q4_k_m": []}
    for _ in range(args.runs):
        bf16 = out / "reference-bf16.gguf"
        convert = timed([reference_python, llama_cpp / "convert_hf_to_gguf.py", ckpt, "--outtype", "bf16", "--outfile", bf16],
                        "reference-convert-bf16", out)
        quantize = timed([sys.executable, "-c", QUANTIZE, bf16, out / "reference-q4_k_m.gguf"], "reference-quantize-q4_k_m", out)
        results["pipeline: convert bf16"].append(convert)
        results["pipeline: quantize q4_k_m"].append(quantize)
        results["pipeline"].append(Measurement(convert.wall_s + quantize.wall_s, max(convert.peak_rss_mb, quantize.peak_rss_mb)))
        results["A: qwen35 q4_k_m"].append(
            timed([qwen35, "convert", ckpt, "-q", "q4_k_m", "-o", out / "qwen35-q4_k_m.gguf", "--force", "--no-mmproj"], "qwen35-q4_k_m", out))
        results["B: qwen35 bf16+q8_0+q4_k_m"].append(
            timed([qwen35, "convert", ckpt, "-q", "bf16", "-q", "q8_0", "-q", "q4_k_m", "-o", out / "three", "--force", "--no-mmproj"],
                  "qwen35-three", out))
        for f in [*out.glob("*.gguf"), *(out / "three").glob("*.gguf")]:
            f.unlink()

    def median(key: str, field: str) -> float:
        return statistics.median(getattr(m, field) for m in results[key])

    print(f"## HF → Q4_K_M on {ckpt.name} ({args.runs} runs each, medians; qwen35 at {source_version()})\n")
    print("| command | wall s | peak RSS MB | wall / pipeline |")
    print("| --- | ---: | ---: | ---: |")
    base = median("pipeline", "wall_s")
    for key in results:
        print(f"| {key} | {median(key, 'wall_s'):.1f} | {median(key, 'peak_rss_mb'):.0f} | {median(key, 'wall_s') / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
