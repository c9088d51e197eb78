"""The turn boundary among a prompt's last tokens: read back from llama.cpp's recurrent-state
snapshots (what ChatSession does) against ending a decode there (what it did before).

With thinking off, the next user turn's prompt diverges 4 tokens before this prompt's end (the
generation prompt's empty think block), so the state there is kept as a checkpoint. One loaded
session, rounds interleaved (the order alternating): a fresh first turn (system + a ~110-token
message; time to the first piece and to the end of a 12-token reply), then a second turn that
resumes from the boundary (time to its first piece). The "ending a decode" side is the same session
with the read-back refused (`Decoder.can_read_back`), so nothing else differs.

    python bench/bench_boundary.py [--model M.gguf] [--threads 2] [--rounds 14]

Default model: the cached random-weight 0.8B Q8_0 of bench_runtime.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench_runtime import model_0_8b

from qwen35.runtime import ChatSession
from qwen35.runtime.engine.decoder import Decoder

MESSAGE = ("Tell me about the history of lighthouse number {} on the northern coast, its keepers, the storms it "
           "survived, and why ships still rely on it today; in detail please, with dates. ") * 2


def timed(chat: ChatSession, messages: list[dict]) -> tuple[float, float, str]:
    start, first, text = time.perf_counter(), None, []
    for piece in chat.respond(messages, max_tokens=12, temp=0, think=False):
        first = first if first is not None else time.perf_counter() - start
        text.append(piece.text)
    return first, time.perf_counter() - start, "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="GGUF to use (default: the cached random 0.8B Q8_0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=14)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/runtime"))
    args = ap.parse_args()
    model = args.model or model_0_8b(args.workdir)
    read_back = Decoder.can_read_back
    results: dict[str, dict[str, list[float]]] = {}
    with ChatSession(model, n_ctx=8192, threads=args.threads, prefill=False, adapt_threads=False,
                     speculative="off") as chat:
        for r in range(args.rounds):
            for way in ("read back", "ending a decode")[::1 if r % 2 else -1]:
                chat.decoder.can_read_back = read_back.__get__(chat.decoder) if way == "read back" else (lambda *_: False)
                chat.cache.forget()
                first = [{"role": "system", "content": f"Chat {r}. Answer briefly."},
                         {"role": "user", "content": MESSAGE.format(r, r)}]
                ttft, total, reply = timed(chat, first)
                second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
                ttft2, _, _ = timed(chat, second)
                row = results.setdefault(way, {"turn 1 TTFT": [], "turn 1 total": [], "turn 2 TTFT": []})
                row["turn 1 TTFT"].append(ttft), row["turn 1 total"].append(total), row["turn 2 TTFT"].append(ttft2)
    print(f"\n{model.name}, {args.threads} threads, {args.rounds} rounds, medians (s):\n")
    print("| boundary state | turn 1 TTFT | turn 1 total | turn 2 TTFT |\n| --- | ---: | ---: | ---: |")
    for way, row in results.items():
        print(f"| {way} | " + " | ".join(f"{statistics.median(v):.3f}" for v in row.values()) + " |")
    a, b = results["read back"], results["ending a decode"]
    print("\nread back ÷ ending a decode: " + ", ".join(
        f"{k} {statistics.median(a[k]) / statistics.median(b[k]):.2f}" for k in a))


if __name__ == "__main__":
    main()
