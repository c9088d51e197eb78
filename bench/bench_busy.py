"""Decode speed on a busy machine: adaptive threads (runtime/adaptive_threads.py) against fixed counts.

Quiet, then with other programs keeping cores busy (`yes > /dev/null`, one per --busy core, started
here and killed at the end, whatever happens): generation tokens/s of one chat reply per round, for
every fixed thread count 1..N and for the adaptive runtime, in interleaved rounds on one loaded
model. Targets: busy, adaptive ≥ 0.9 × the best fixed count; quiet, adaptive ≥ 0.98 × today's fixed
default (N threads).

    python bench/bench_busy.py [--model M.gguf] [--threads N] [--busy 1] [--rounds 5] [--tokens 128]

Default model: the random-weight 0.8B checkpoint of bench_convert.py as Q4_K_M (converted once).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

from bench_convert import converted_0_8b

PROMPT = "Write a long story about a lighthouse keeper."


def decode_tps(chat, threads: int, adapt: bool, tokens: int) -> float:
    chat.set_threads(threads, adapt=adapt)
    chat.reset()
    return chat.send(PROMPT, max_tokens=tokens).stats["gen_tps"]


def measure(chat, max_threads: int, rounds: int, tokens: int) -> dict:
    configs = [(n, False) for n in range(1, max_threads + 1)] + [(max_threads, True)]
    results = {c: [] for c in configs}
    for _ in range(rounds):
        for c in configs:
            results[c].append(decode_tps(chat, *c, tokens))
    return {c: statistics.median(v) for c, v in results.items()}


def main() -> None:
    from qwen35.runtime import ChatSession
    from qwen35.system import performance_cores

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--threads", type=int, default=performance_cores())
    ap.add_argument("--busy", type=int, default=1, help="cores other programs keep busy")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/runtime"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or converted_0_8b(args.workdir, "q4_k_m")
    print(f"model {model}, up to {args.threads} threads, {args.rounds} rounds of {args.tokens} tokens\n")

    with ChatSession(model, n_ctx=2048, threads=args.threads, seed=1, temp=0, think=False, prefill=False,
                     speculative="off") as chat:
        chat.send("warm-up", max_tokens=8)
        quiet = measure(chat, args.threads, args.rounds, args.tokens)
        hogs = [subprocess.Popen(["sh", "-c", "exec yes > /dev/null"]) for _ in range(args.busy)]
        try:
            time.sleep(1)
            busy = measure(chat, args.threads, args.rounds, args.tokens)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()

    print(f"| threads | quiet tokens/s | with {args.busy} busy core(s) |")
    print("| --- | ---: | ---: |")
    for (n, adapt), tps in quiet.items():
        print(f"| {'adaptive, up to ' if adapt else ''}{n} | {tps:.2f} | {busy[(n, adapt)]:.2f} |")
    adaptive = (args.threads, True)
    best_fixed = max(v for (n, a), v in busy.items() if not a)
    print(f"\nbusy: adaptive / best fixed = {busy[adaptive] / best_fixed:.3f} (target ≥ 0.9)")
    print(f"quiet: adaptive / fixed {args.threads} threads (today's default) = "
          f"{quiet[adaptive] / quiet[(args.threads, False)]:.3f} (target ≥ 0.98)")


if __name__ == "__main__":
    main()
