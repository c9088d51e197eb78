"""Structured output against free text: tokens/s of the same model, prompt and sampling with no
constraint, under llguidance (what qwen35 uses) and under llama.cpp's GBNF grammar sampler (the
fallback, and what it used before), for JSON schema, JSON object, a required and a named tool call.

One loaded ChatSession, thinking off, `--tokens` sampled tokens a reply (temperature 0.8, a fixed
seed per round), rounds interleaved. A reply under a grammar may end before `--tokens` (the grammar
closed); the rates are per token over all rounds: decode time from the first token to the last,
as `stats["gen_tps"]` counts it. For llguidance, how many draws the grammar refused (each costs a
token mask), the mask time per token, and all the grammar's time per token (checks, masks, draws
again), both as CPU time of the sampling thread, which the machine's load does not inflate the way
it does a decode's wall time. On random weights (the default) the model never follows
the format by itself: the worst case, where most structural tokens are refused.

    python bench/bench_grammar.py [--size tiny|0.8b|4b | --model M.gguf | --model demo] [--tokens 96] [--rounds 3]
        [--think] [--peer] [--no-gbnf]

`--think`: thinking on, so each reply is a reasoning and then the constrained answer (the grammar
starts after `</think>`). `--peer`: then llama-server on the same file and threads, free text and
`response_format` json_schema with the same prompt and sampling, its own decode rate (`timings`).

`--size` builds (once, cached in --workdir) a random-weight Q4_K_M with the release dimensions,
as bench_mtp.py does. `--model demo` is the trained demo model (Q8_0, as `qwen35 demo` converts it),
asked within its world (the capital of Peru as JSON, with a schema of country and capital; the weather
in Helsinki with its tools, `get_weather` named): a model that follows the format by itself, where
the grammar should only check.

First, the grammar's work alone, on the model's vocabulary without its weights (so the machine's
load, which slows a decode, barely touches it): per token, when the "model" writes a well-formed
output by itself (every token its best; the grammar only checks) and when its draws are noise
(temperature 0.8, top-k 40 over random logits: most are refused, each refusal a mask and a draw
again). Free text's decode time per token is the budget it is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"tiny": None, "0.8b": "qwen3.5-0.8b.config.RECONSTRUCTED.json", "4b": "qwen3.5-4b.config.RECONSTRUCTED.json"}
PROMPT = "Describe the weather in Lisbon today: the city, the temperature, whether it is sunny, and a short note."
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "celsius", "sunny", "note"],
          "properties": {"city": {"type": "string"}, "celsius": {"type": "number"}, "sunny": {"type": "boolean"},
                         "note": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "required": ["city"], "properties": {
                                               "city": {"type": "string"},
                                               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
         {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {
             "type": "object", "required": ["query"], "properties": {"query": {"type": "string"},
                                                                      "limit": {"type": "integer"}}}}}]


# The demo model's world (demo/training/corpus.py): what it answers by itself.
DEMO_PROMPT = "Give me the capital of Peru as JSON."
DEMO_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["country", "capital"],
               "properties": {"country": {"type": "string"}, "capital": {"type": "string"}}}
DEMO_TOOL_PROMPT = "What's the weather in Helsinki?"
FREE_WITH_TOOLS = "free text, tools offered"  # (no constraint: what the model writes by itself)


def random_gguf(size: str, workdir: Path) -> Path:
    os.environ["QWEN35_TEST_CACHE"] = str(workdir / "models")
    sys.path.insert(0, str(REPO))  # the repository's tests package
    from tests.mtp_fixtures import build_gguf, variant_config

    config = variant_config(tied=False) if CONFIGS[size] is None else \
        json.loads((REPO / "tests" / "release_configs" / CONFIGS[size]).read_text())
    print(f"model {size} (building it if absent) …", flush=True)
    return build_gguf(config, "q4_k_m")


WELL_FORMED = {
    "json_schema": '{"city": "Lisbon", "celsius": 21.5, "sunny": true, "note": "A clear, warm day with a light '
                   'breeze from the sea, and no rain expected before the weekend."}',
    "json_object": '{"city": "Lisbon", "celsius": 21.5, "sunny": true, "note": "A clear, warm day."}',
    "tool required": "<tool_call>\n<function=get_weather>\n<parameter=city>\nLisbon\n</parameter>\n"
                     "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>",
    "tool named": "<tool_call>\n<function=search>\n<parameter=query>\nweather in Lisbon today\n</parameter>\n"
                  "<parameter=limit>\n5\n</parameter>\n</function>\n</tool_call>",
}


def grammar_work(path: Path, tokens: int) -> None:
    """Milliseconds of grammar work per token, well-formed and noise, on the vocabulary alone."""
    import numpy as np

    from qwen35.runtime.conversation import constraints
    from qwen35.runtime.engine import native

    model = native.Model(str(path), vocab_only=True)
    try:
        constraints.tokenizer(model)
        end = model.single_token("<|im_end|>")
        rng = np.random.default_rng(0)
        print("| output | well-formed: grammar ms/token | refused | noise: grammar ms/token | refused |")
        print("|---|---:|---:|---:|---:|")
        for case, constraint in cases(True).items():
            row = []
            for follows in (True, False):
                natives, grammar = constraints.prepare(model, constraint, in_reasoning=False)
                sampler = native.Sampler(native.Sampling(temp=0.8, top_k=40, seed=1), model.n_vocab, natives, grammar)
                try:
                    script = model.tokenize(WELL_FORMED[case]) + [end] if follows else [None] * tokens
                    n = 0
                    for token in script:
                        logits = rng.normal(0, 1, model.n_vocab).astype(np.float32)
                        if token is not None:
                            logits[token] = 30.0
                        n += 1
                        if model.is_eog(sampler.sample_logits(logits)):
                            break
                    stage = sampler.grammar
                    row += [f"{1000 * stage.seconds / n:.3f}", f"{stage.refused}/{n}"]
                finally:
                    sampler.close()
            print(f"| {case} | " + " | ".join(row) + " |")
        print()
    finally:
        model.close()


def cases(fast: bool, schema: dict = SCHEMA, tools: list[dict] = TOOLS, named: str = "search") -> dict:
    from qwen35.runtime.conversation.constraints import json_constraint, tool_call_constraint

    return {"json_schema": json_constraint(schema, fast=fast), "json_object": json_constraint(None, fast=fast),
            "tool required": tool_call_constraint(tools, None, True, fast=fast),
            "tool named": tool_call_constraint(tools, named, False, fast=fast)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(CONFIGS), default="0.8b")
    ap.add_argument("--model", help="a GGUF to use instead of a random-weight --size, or `demo` (the trained "
                                    "demo model, asked within its world)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gbnf", action="store_true", help="leave out llama.cpp's grammar sampler (slow)")
    ap.add_argument("--grammar-only", action="store_true", help="only the grammar's work on the vocabulary")
    ap.add_argument("--think", action="store_true", help="thinking on: the grammar applies after </think>")
    ap.add_argument("--peer", action="store_true", help="also llama-server's json_schema against its free text, "
                                                       "same file, threads and sampling")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/grammar"))
    args = ap.parse_args()

    from qwen35.runtime import ChatSession
    from qwen35.runtime.conversation import constraints

    if not constraints.FAST:
        raise SystemExit("llguidance is not installed: pip install llguidance")
    world = dict(schema=SCHEMA, tools=TOOLS, named="search")
    prompt, tool_prompt = PROMPT, PROMPT
    if args.model == "demo":
        from qwen35.demo.training import corpus
        from qwen35.demo.walkthrough import build

        model = next(o.path for o in build(args.workdir / "demo")[1] if not o.path.name.startswith("mmproj"))
        world = dict(schema=DEMO_SCHEMA, tools=corpus.TOOLS, named="get_weather")
        prompt, tool_prompt = DEMO_PROMPT, DEMO_TOOL_PROMPT
    else:
        model = Path(args.model) if args.model else random_gguf(args.size, args.workdir)
    grammar_work(model, args.tokens)
    if args.grammar_only:
        return
    engines = {"llguidance": cases(True, **world)} | ({} if args.no_gbnf else {"gbnf": cases(False, **world)})
    totals: dict[tuple[str, str], list[float]] = {}  # (case, engine) -> [tokens, seconds, refused, mask s, grammar s]
    with ChatSession(model, n_ctx=4096, threads=args.threads, prefill=False, adapt_threads=False,
                     speculative="off") as chat:
        start = time.perf_counter()
        chat.prepare_constraints()
        print(f"{model.name}: llguidance's vocabulary built in {time.perf_counter() - start:.1f} s", flush=True)
        # Free text twice: without tools and with them offered (their system block lengthens the context
        # the tool calls decode in); each constrained output is compared with the free text of its prompt.
        runs = [("free text", "none", None), (FREE_WITH_TOOLS, "none", None)] + [
            (case, engine, c) for engine, by_case in engines.items() for case, c in by_case.items()]
        for rnd in range(args.rounds):
            for case, engine, constraint in (runs if rnd % 2 == 0 else runs[::-1]):
                tooled = "tool" in case  # (FREE_WITH_TOOLS too)
                messages = [{"role": "user", "content": tool_prompt if tooled else prompt}]
                for _ in chat.respond(messages, tools=world["tools"] if tooled else None, constraint=constraint,
                                      think=args.think, temp=0.8, seed=1000 + rnd, max_tokens=args.tokens):
                    pass
                s = chat.stats
                n, tps = s["gen_tokens"], s["gen_tps"]
                print(f"  round {rnd + 1}: {case} ({engine}): {n} tokens, {tps or 0:.1f} tokens/s", flush=True)
                row = totals.setdefault((case, engine), [0, 0.0, 0, 0.0, 0.0])
                if n > 1 and tps:
                    row[0] += n
                    row[1] += n / tps
                row[2] += s.get("grammar_refused", 0)
                row[3] += s.get("grammar_mask_s", 0.0)
                row[4] += s.get("grammar_s", 0.0)
    free_tps = {tooled: totals[key][0] / totals[key][1] for tooled, key in
                ((False, ("free text", "none")), (True, (FREE_WITH_TOOLS, "none")))}
    print(f"\n{args.rounds} rounds, up to {args.tokens} sampled tokens a reply, {args.threads} threads\n")
    print(f"free text: {1000 / free_tps[False]:.1f} ms a token; with the tools offered "
          f"{1000 / free_tps[True]:.1f}\n")
    print("| output | engine | tokens | tokens/s | × free text | refused draws | mask ms/token | grammar ms/token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (case, engine), (tokens, seconds, refused, mask_s, grammar_s) in totals.items():
        tps = tokens / seconds if seconds else float("nan")
        ours = engine == "llguidance" and tokens
        masks = f"{refused} ({refused / tokens:.0%})" if ours else ""
        mask = f"{1000 * mask_s / tokens:.2f}" if ours else ""
        work = f"{1000 * grammar_s / tokens:.2f}" if ours else ""
        print(f"| {case} | {engine} | {tokens} | {tps:.1f} | {tps / free_tps['tool' in case]:.2f} | {masks} | {mask} "
              f"| {work} |")
    if args.peer:
        ours = totals[("json_schema", "llguidance")]
        peer_json_schema(model, args, prompt, world["schema"], ours[0] / ours[1], free_tps[False])


def peer_json_schema(model: Path, args, prompt: str, schema: dict, ours_tps: float, ours_free_tps: float) -> None:
    """llama-server (built from the pinned sdist, once: bench_runtime.llama_cpp_tool) on the same file
    and threads: free text and `response_format` json_schema (its GBNF grammar from the schema), the
    same prompt, sampling and thinking, rounds interleaved; its own decode rate (`timings`)."""
    import urllib.request

    from bench_runtime import llama_cpp_tool
    from bench_server import Server, withholds_amx

    binary = llama_cpp_tool(args.workdir.parent / "runtime", "llama-server", without_amx=withholds_amx(model))
    server = Server([], args.workdir / "llama-server.log", dict(os.environ))
    server.name = "llama-server"
    server.command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(server.port), "-t",
                      str(args.threads), "-tb", str(args.threads), "-c", "4096", "-np", "1"]
    server.start()
    totals = {"free text": [0, 0.0], "json_schema": [0, 0.0]}
    try:
        server.wait_ready()
        for rnd in range(args.rounds):
            for case in (("free text", "json_schema") if rnd % 2 == 0 else ("json_schema", "free text")):
                body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.tokens,
                        "temperature": 0.8, "seed": 1000 + rnd,
                        "chat_template_kwargs": {"enable_thinking": args.think}}
                if case == "json_schema":
                    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
                request = urllib.request.Request(server.base + "/v1/chat/completions", json.dumps(body).encode(),
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=1800) as r:  # noqa: S310 - 127.0.0.1 only
                    timings = json.loads(r.read())["timings"]
                print(f"  round {rnd + 1}: llama-server {case}: {timings['predicted_n']} tokens, "
                      f"{timings['predicted_per_second']:.1f} tokens/s", flush=True)
                if timings["predicted_n"] > 1:
                    totals[case][0] += timings["predicted_n"]
                    totals[case][1] += timings["predicted_ms"] / 1000
    finally:
        server.stop()
    free, constrained = (totals[c][0] / totals[c][1] for c in ("free text", "json_schema"))
    print("\n| json_schema | tokens/s | × its free text | ours ÷ llama-server |")
    print("|---|---:|---:|---:|")
    print(f"| llama-server | {constrained:.1f} | {constrained / free:.2f} | |")
    print(f"| qwen35 (llguidance) | {ours_tps:.1f} | {ours_tps / ours_free_tps:.2f} | {ours_tps / constrained:.2f} |")


if __name__ == "__main__":
    main()
