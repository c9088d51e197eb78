"""Chat runtime benchmarks: multi-turn prompt cost, and speed against native llama-bench.

1. A 6-turn chat (≈200-token messages, 40-token answers, so ≈240 new tokens a turn) through
   ChatSession, repeated: tokens evaluated and the median time to first token per turn, next to what
   a runtime that re-processes the conversation would evaluate (the whole template rendering) —
   once with each message sent as soon as the answer ends, once after a pause standing for the
   user's reading and typing (the runtime prefills the next prompt meanwhile).
2. `qwen35 bench MODEL --json` against llama-bench built from the same llama-cpp-python 0.3.36 sdist
   (same GGUF, same threads, pp512 / tg128, the same buffer types for the weights), in interleaved
   rounds: prints the ratios (targets: tg ≥ 0.95, pp ≥ 0.97) and where each side's weights landed.

The model is a random-weight checkpoint with Qwen3.5-0.8B's real dimensions, converted to Q8_0 once
and cached in the work directory; llama-bench is built there too if absent (several minutes).

    python bench/bench_runtime.py [--model M.gguf] [--threads N] [--workdir /tmp/qwen35-bench/runtime]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp

from bench_convert import converted_0_8b, ensure_sdist

TOPICS = ["lighthouses", "tide pools", "sourdough bread", "the printing press", "glaciers", "beekeeping"]


def model_0_8b(workdir: Path) -> Path:
    return converted_0_8b(workdir, "q8_0", mmproj=None)


def llama_bench_binary(workdir: Path) -> Path:
    """llama-bench from the sdist that llama-cpp-python was built from: CPU, Release, native flags
    (the Python package's build is native too: its system info lists this CPU's AVX-512)."""
    return llama_cpp_tool(workdir, "llama-bench")


def llama_cpp_tool(workdir: Path, target: str, *, without_amx: bool = False) -> Path:
    """A llama.cpp tool (llama-bench, llama-server) built once in `workdir`/llama-bench-build from
    the pinned sdist; one build directory, so its libraries are compiled once for every tool. The
    server is built without its web UI (which would be fetched from the network). `without_amx`:
    in a build of its own with the AMX kernels compiled out (-march=native would build them on an
    AMX CPU), for a machine where qwen35 withholds them — the binaries cannot be told to."""
    build = workdir / ("llama-bench-build-noamx" if without_amx else "llama-bench-build")
    binary = build / "bin" / target
    if binary.is_file():
        return binary
    print(f"building {target} in {build} (several minutes) …", flush=True)
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    flags = [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"] if without_amx else []
    subprocess.run(["cmake", "-S", str(ensure_sdist(workdir.parent)), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    f"-DLLAMA_BUILD_SERVER={'ON' if target == 'llama-server' else 'OFF'}", "-DLLAMA_BUILD_UI=OFF",
                    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON",
                    "-DBUILD_SHARED_LIBS=OFF", *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", target, "-j", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


def _message(turn: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    return (f"Question {turn + 1}. I am writing notes about {topic}. " +
            f"Explain how {topic} work, what their history is, and why people care about them. " * 9)


def multi_turn(model: Path, threads: int, turns: int, chats: int, pause: float) -> list[dict]:
    """`pause` stands for the user reading the answer and typing the next message: the runtime
    prefills the known start of the next prompt meanwhile. With no pause, the next message waits."""
    from qwen35.runtime import ChatSession

    rows = [{"turn": t + 1, "ttft_s": []} for t in range(turns)]
    with ChatSession(model, n_ctx=8192, threads=threads, think=False, seed=1, max_tokens=40, speculative="off") as chat:
        chat.send("warm-up", max_tokens=2)
        for _ in range(chats):
            chat.reset()
            for turn, row in enumerate(rows):
                reply = chat.send(_message(turn))
                full = len(chat.tokenize(chat.template.render(
                    chat._conversation()[:-1], add_generation_prompt=True, think=False)))
                row.update(prompt_tokens=reply.stats["prompt_tokens"], cached_tokens=reply.stats["cached_tokens"],
                           prefilled_tokens=reply.stats["prefilled_tokens"], full_prompt_tokens=full)
                row["ttft_s"].append(reply.stats["ttft_s"])
                time.sleep(pause)
    for row in rows:
        row["ttft_s"] = statistics.median(row["ttft_s"])
    return rows


def llama_cpp_python_chat(model: Path, threads: int, turns: int) -> list[float]:
    """Time to first token per turn of the same chat through llama-cpp-python's own
    create_chat_completion (the GGUF's template; it re-evaluates what it cannot reuse)."""
    from llama_cpp import llama_chat_format

    from qwen35.runtime.engine.modelfile import read_model_file

    # Its chat completion cannot pass enable_thinking to the template: wrap the formatter to do so.
    formatter = llama_chat_format.Jinja2ChatFormatter(read_model_file(model).chat_template, eos_token="<|im_end|>",
                                                      bos_token="")
    handler = llama_chat_format.chat_formatter_to_chat_completion_handler(
        lambda **kw: formatter(**kw, enable_thinking=False))
    # The same placement of the weights as qwen35's (AMX only where it works) before the peer loads.
    from qwen35.runtime.engine import cpu

    cpu.place_weights(model)
    llm = llama_cpp.Llama(str(model), n_ctx=8192, n_threads=threads, n_threads_batch=threads, seed=1,
                          chat_handler=handler, verbose=False)
    messages, ttfts = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": _message(turn)})
        start, first, answer = time.perf_counter(), None, []
        for chunk in llm.create_chat_completion(messages, max_tokens=40, stream=True):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta and first is None:
                first = time.perf_counter() - start
            answer.append(delta or "")
        ttfts.append(first if first is not None else time.perf_counter() - start)
        messages.append({"role": "assistant", "content": "".join(answer)})
    return ttfts


def ours(model: Path, threads: int, reps: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "qwen35.cli", "bench", str(model), "-t", str(threads),
                          "-p", "512", "-n", "128", "-r", str(reps), "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def native(binary: Path, model: Path, threads: int, reps: int, repack: bool) -> dict:
    """llama-bench's pp/tg, and where its weights landed (from its verbose load log)."""
    from qwen35.runtime.engine.native import _placement

    out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-p", "512", "-n", "128",
                          "-r", str(reps), "--repack", "1" if repack else "0", "-o", "json", "-v"],
                         check=True, capture_output=True, text=True)
    results = {"weights": _placement([line for line in out.stderr.splitlines() if "model buffer size" in line])}
    for test in json.loads(out.stdout):
        results["pp" if test["n_prompt"] and not test["n_gen"] else "tg"] = {"tps": test["avg_ts"]}
    return results


def chat_tables(model: Path, args) -> None:
    rows = multi_turn(model, args.threads, args.turns, args.chats, pause=0)
    paused = multi_turn(model, args.threads, args.turns, args.chats, pause=args.pause)
    print(f"| turn | evaluated | of which prefilled | reused | a re-processing runtime would evaluate "
          f"| time to first token, next message at once | after a {args.pause:g} s pause |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r, p in zip(rows, paused):
        print(f"| {r['turn']} | {r['prompt_tokens']} | {r['prefilled_tokens']} | {r['cached_tokens']} "
              f"| {r['full_prompt_tokens']} | {r['ttft_s']:.3f} s | {p['ttft_s']:.3f} s |")
    first, last = rows[0], rows[-1]
    print(f"\nturn {last['turn']} / turn 1 (median of {args.chats} chats): prompt tokens "
          f"{last['prompt_tokens'] / first['prompt_tokens']:.2f}x; time to first token "
          f"{last['ttft_s'] / first['ttft_s']:.2f}x with the next message at once, "
          f"{paused[-1]['ttft_s'] / paused[0]['ttft_s']:.2f}x after a {args.pause:g} s pause (target ≤ 1.3x)\n")
    if args.llama_cpp_python:
        ttfts = llama_cpp_python_chat(model, args.threads, args.turns)
        print("llama-cpp-python create_chat_completion, time to first token per turn: "
              + ", ".join(f"{t:.2f} s" for t in ttfts)
              + f" (turn {len(ttfts)} / turn 1: {ttfts[-1] / ttfts[0]:.2f}x)\n")


def compare_with_llama_bench(model: Path, args) -> None:
    binary = llama_bench_binary(args.workdir)
    # Interleaved rounds, so that load from other processes hits both sides alike; the best round
    # is the least disturbed measurement of each.
    mine, theirs = {"pp": [], "tg": []}, {"pp": [], "tg": []}
    peak = 0
    placements = None
    for round_number in range(1, args.rounds + 1):
        ours_round = ours(model, args.threads, args.reps)
        peak = max(peak, ours_round["peak_rss_bytes"])
        # llama-bench can offer all of the extra buffer types or none: all, unless qwen35 held AMX
        # back here (then none, which matches whenever CPU_REPACK takes nothing of this file).
        repack = ours_round["amx"]["on"] or "AMX" not in ours_round["extra_buffer_types"]
        native_round = native(binary, model, args.threads, args.reps, repack)
        placements = (ours_round["weights"], native_round["weights"])
        for name in ("pp", "tg"):
            mine[name].append(ours_round["runs"][0][name]["tps"])
            theirs[name].append(native_round[name]["tps"])
        # As it goes: a bench cut short still says what it measured.
        print(f"round {round_number}: " + ", ".join(f"{name} qwen35 {mine[name][-1]:.2f} / llama-bench "
                                                    f"{theirs[name][-1]:.2f} t/s" for name in ("pp", "tg")), flush=True)
    print(f"{args.rounds} interleaved rounds of {args.reps} repetitions each; tokens/s per round:")
    for name in ("pp", "tg"):
        print(f"  {name} qwen35 {[round(x, 2) for x in mine[name]]}  llama-bench {[round(x, 2) for x in theirs[name]]}")
    print()
    print("| test | qwen35 (median / best) | llama-bench (median / best) | ratio of medians | ratio of bests "
          "| target |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, target in (("pp", 0.97), ("tg", 0.95)):
        a, b = mine[name], theirs[name]
        print(f"| {name}{512 if name == 'pp' else 128} | {statistics.median(a):.2f} / {max(a):.2f} "
              f"| {statistics.median(b):.2f} / {max(b):.2f} | {statistics.median(a) / statistics.median(b):.3f} "
              f"| {max(a) / max(b):.3f} | ≥ {target} |")
    print(f"\nqwen35 bench peak memory: {peak / 2**20:,.0f} MiB")
    mine_where, theirs_where = (", ".join(f"{k} {v:,.1f} MiB" for k, v in p.items()) for p in placements)
    same = set(placements[0]) == set(placements[1])
    print(f"weights: qwen35 {mine_where}; llama-bench {theirs_where} "
          f"({'the same buffer types' if same else 'DIFFERENT buffer types: the ratios compare different kernels'})")


def main() -> None:
    from qwen35.system import physical_cores

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="GGUF to use (default: a cached random 0.8B Q8_0)")
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/runtime"))
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--chats", type=int, default=3, help="repetitions of the multi-turn chat")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between a reply and the next message")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-native", action="store_true", help="only the multi-turn part")
    ap.add_argument("--skip-chat", action="store_true", help="only the comparison with llama-bench")
    ap.add_argument("--llama-cpp-python", action="store_true",
                    help="also time the same chat through llama-cpp-python's create_chat_completion")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or model_0_8b(args.workdir)
    print(f"model {model}, {args.threads} threads, llama-cpp-python {llama_cpp.__version__}\n")

    if not args.skip_chat:
        chat_tables(model, args)
    if not args.skip_native:
        compare_with_llama_bench(model, args)


if __name__ == "__main__":
    main()
