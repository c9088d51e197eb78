"""Peak memory of loading a model and answering once: qwen35 (which reads a file mostly copied at
load time, memory.maps_weights) against llama-cpp-python's `Llama` (which maps it), same file,
context and threads, and qwen35 made to map it too (what it did before).

Where llama.cpp copies weights into AMX or CPU_REPACK buffers (x86 with AVX2: Q4_0, Q4_K; ARM with
dotprod: nearly every quantized type), a mapped file's pages of the copied weights stay resident
after loading, never read again. Target: qwen35's peak RSS below the mapped runs' by about the
copied weights' size, at the same time to a first reply.

    python bench/bench_load.py [--model M.gguf] [--reps 3] [--threads 2] [--ctx 4096]

Each run is a child process; its peak RSS is what the kernel reports for it (`wait4`'s ru_maxrss,
as `/usr/bin/time -v`). Default model: the random-weight 0.8B checkpoint of bench_convert.py as
Q4_0 (converted once into the work directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_convert import converted_0_8b

PROMPT = "Write a short story about a lighthouse keeper."

# Each child prints one JSON line: seconds to a loaded model, seconds to the whole reply, placement.
QWEN35 = """
import json, sys, time
from qwen35.runtime import ChatSession
from qwen35.runtime.engine import memory
if sys.argv[2] == "mapped":
    memory.maps_weights = lambda weights, idle: True
t = time.perf_counter()
s = ChatSession(sys.argv[1], n_ctx=int(sys.argv[3]), threads=int(sys.argv[4]), seed=1, speculative="off")
loaded = time.perf_counter() - t
s.send(sys.argv[5], max_tokens=16, temp=0)
print(json.dumps({"load_s": loaded, "total_s": time.perf_counter() - t, "mapped": s.memory.mapped,
                  "placement": s.decoder.model.placement}))
"""
LLAMA_CPP_PYTHON = """
import json, sys, time
from llama_cpp import Llama
t = time.perf_counter()
m = Llama(sys.argv[1], n_ctx=int(sys.argv[3]), n_threads=int(sys.argv[4]), verbose=False)
loaded = time.perf_counter() - t
m(sys.argv[5], max_tokens=16, temperature=0)
print(json.dumps({"load_s": loaded, "total_s": time.perf_counter() - t, "mapped": True, "placement": {}}))
"""
RUNS = {"qwen35": (QWEN35, "auto"), "qwen35 mapped": (QWEN35, "mapped"), "llama-cpp-python Llama": (LLAMA_CPP_PYTHON, "")}
# The peer runs with AMX withheld, as qwen35 withholds it where it crashes (bench/without_amx.py).
WITHOUT_AMX = Path(__file__).resolve().parent / "without_amx.py"


def run(name: str, model: Path, args) -> dict:
    script, mode = RUNS[name]
    path = args.workdir / f"bench-load-{'qwen35' if script is QWEN35 else 'llama-cpp-python'}.py"
    path.write_text(script)
    runner = [WITHOUT_AMX] if script is LLAMA_CPP_PYTHON else []
    child = subprocess.Popen([sys.executable, *runner, path, str(model), mode, str(args.ctx), str(args.threads), PROMPT],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{name}: the child failed (wait status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mib"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/runtime"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or converted_0_8b(args.workdir, "q4_0")
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    for rep in range(args.reps):
        for name in (list(RUNS) if rep % 2 == 0 else list(RUNS)[::-1]):
            r = run(name, model, args)
            results[name].append(r)
            print(f"rep {rep + 1} {name}: peak {r['peak_mib']:,.0f} MiB, loaded in {r['load_s']:.2f} s, "
                  f"reply done at {r['total_s']:.2f} s, mapped {r['mapped']}, {r['placement']}", flush=True)
    peer = statistics.median(r["peak_mib"] for r in results["llama-cpp-python Llama"])
    print(f"\n{model.name}, {args.threads} threads, context {args.ctx}, medians of {args.reps}:\n")
    print("| run | peak RSS | vs Llama | loaded | reply done |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, rows in results.items():
        peak = statistics.median(r["peak_mib"] for r in rows)
        print(f"| {name} | {peak:,.0f} MiB | {peak / peer:.2f} | {statistics.median(r['load_s'] for r in rows):.2f} s "
              f"| {statistics.median(r['total_s'] for r in rows):.2f} s |")


if __name__ == "__main__":
    main()
