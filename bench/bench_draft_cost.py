"""Cost of one MTP draft: the whole vocabulary against the reduced draft vocabulary (FR-Spec,
runtime/engine/draft_head.py), in units of one plain decoded token; and what the reduction costs in
acceptance.

Cost: one model, one target context and one Speculator per setting (whole vocabulary; K = each of
--vocab), all fed the same prompt. Each round times, in an order drawn anew (seeded by the round),
--reps calls of: a plain decode of one token by the target ("token"); a one-token draft of each
Speculator (Speculator.draft at the position after the prompt: its MTP graph, then its output
layer, whole or reduced); and the MTP graph alone with no output row ("graph only": the floor a
reduced draft approaches as K shrinks). The figure is the median over --rounds of each round's mean
per call; the load average is printed before and after, since another program on the machine moves
every figure.

Acceptance (`--acceptance`): greedy replies (n_draft 3) with the whole vocabulary and with each K,
checked token-identical to plain decoding, with the drafts accepted/made and the time of all
replies against plain decoding's (median of --rounds, the settings in an order drawn anew). On the trained demo model
(`demo`: its prompts, thinking on) this is the real cost of the reduction; on a controlled fixture
the MTP head's successors are spread uniformly over all 248,044 regular ids (tests/mtp_fixtures.py),
so a ranked subset of K keeps only ~K/248,044 of them: a worst case, not a forecast.

Models: --size tiny|0.8b|4b picks bench_mtp's controlled fixture at acceptance 0.8 (tiny: the
tests' model, hidden 128; built if absent, which for 0.8b/4b takes minutes and GBs), or --model a
GGUF with its MTP block.

    .venv/bin/python bench/bench_draft_cost.py [--size tiny] [--model M.gguf] [--vocab 16384,32768,65536]
        [--threads 2] [--rounds 7] [--reps 20] [--acceptance tiny,demo] [--workdir /tmp/qwen35-bench/mtp]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "<|im_start|>user\nTell me about lighthouses.<|im_end|>\n<|im_start|>assistant\n<think>\n"
DEMO_PROMPTS = ["Hello! Who are you?", "What is the capital of Kenya?", "Tell me the capital of Chile.",
                "What is the capital of Norway?", "Which city is the capital of Japan?",
                "What is the capital of Peru?", "Give the capital of Egypt as JSON."]


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def model_path(args) -> Path:
    if args.model:
        return Path(args.model)
    sys.path.insert(0, str(REPO / "bench"))
    from bench_mtp import controlled_gguf

    return controlled_gguf(args.size, 0.8, args.workdir)


def costs(path: Path, args) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType

    from qwen35.runtime.engine import native
    from qwen35.runtime.engine.speculative import Speculator

    model = native.Model(str(path), load_mtp=True)
    target = native.Context(model, 2048, args.threads, 512, n_outputs=2, n_rollback=1)
    settings = {"whole vocabulary": Speculator(model, target, 1, args.threads)}
    for k in args.vocab:
        settings[f"K = {k:,}"] = Speculator(model, target, 1, args.threads, draft_vocab=k)
    prompt = model.tokenize(PROMPT)
    target.decode(prompt, 0)
    for spec in settings.values():
        spec.feed(prompt, 0)
    pos = len(prompt)
    last = int(np.argmax(target.logits(-1)))
    graph_only = next(s for s in settings.values() if s._head is not None) if args.vocab else None
    state = {"next": pos}

    def token():
        target.decode([last], state["next"])
        state["next"] += 1

    def graph():  # the MTP graph of a reduced draft, without its product
        graph_only._clear_batch()
        graph_only._add(last, pos, graph_only._pending, output=False)
        graph_only._process()
        graph_only._trim(pos)

    shapes = {"token": token}
    for name, spec in settings.items():
        shapes[f"draft, {name}"] = lambda spec=spec: spec.draft(last, pos, 1)
    if graph_only is not None:
        shapes["graph only (no output layer)"] = graph
    print(f"{path.name}: n_embd {model.n_embd}, threads {args.threads}, {args.rounds} rounds x {args.reps} calls; "
          f"{load()}", flush=True)
    for name, spec in settings.items():
        if spec._head is not None:
            print(f"  {name}: {spec._head.tensor_name} rows in {spec._head.weight_bytes / 2**20:.1f} MiB "
                  f"({GGMLQuantizationType(spec._head.ggml_type).name})")
    timings: dict[str, list[float]] = {name: [] for name in shapes}
    for round_ in range(args.rounds + 1):
        order = list(shapes)
        random.Random(round_).shuffle(order)
        for name in order:
            if state["next"] + args.reps >= target.n_ctx:
                target.trim(pos)  # (never reached with the defaults: n_ctx 2048)
                state["next"] = pos
            start = time.perf_counter()
            for _ in range(args.reps):
                shapes[name]()
            if round_:  # round 0 warms every shape up (its graph is built then)
                timings[name].append((time.perf_counter() - start) / args.reps)
    unit = statistics.median(timings["token"])
    print(f"  {'':34} {'ms':>8} {'x token':>8}   (median of rounds; spread min..max ms)")
    for name, values in timings.items():
        m = statistics.median(values)
        print(f"  {name:34} {1e3 * m:8.3f} {m / unit:8.3f}   ({1e3 * min(values):.3f}..{1e3 * max(values):.3f})")
    print(f"  after: {load()}", flush=True)
    for spec in settings.values():
        spec.close()
    target.close()
    model.close()


def _generate(model, ctx, spec, prompt: list[int], n: int) -> list[int]:
    from qwen35.runtime.engine import native

    sampler = native.Sampler(native.Sampling(temp=0), model.n_vocab)
    try:
        ctx.clear()
        ctx.decode(prompt, 0)
        if spec:
            spec.clear()
            spec.feed(prompt, 0)
        pos, out = len(prompt), [sampler.sample(ctx)]
        while len(out) < n and not model.is_eog(out[-1]):
            if spec is None:
                ctx.decode([out[-1]], pos)
                pos += 1
                out.append(sampler.sample(ctx))
                continue
            _, sampled = spec.step(out[-1], pos, sampler, min(spec.n_draft, n - len(out) - 1), model.is_eog)
            pos += len(sampled)
            spec.keep(pos)
            out += sampled
        return out[:n]
    finally:
        sampler.close()


def acceptance(name: str, path: Path, prompts: list[str], args, n_tokens: int = 96) -> None:
    """Drafts accepted per setting (and the tokens checked against plain decoding), and the decode
    speed of the replies: --rounds rounds, the settings in an order drawn anew each round, the
    median of each setting's time for all replies (prompt evaluation included, the same for all)."""
    from qwen35.runtime.engine import native
    from qwen35.runtime.engine.speculative import Speculator

    model = native.Model(str(path), load_mtp=True)
    plain = native.Context(model, 2048, args.threads, 512)
    ctx = native.Context(model, 2048, args.threads, 512, n_outputs=4, n_rollback=3)
    settings = {"plain": None, "whole vocabulary": Speculator(model, ctx, 3, args.threads)}
    for k in args.vocab:
        settings[f"K = {k:,}"] = Speculator(model, ctx, 3, args.threads, draft_vocab=k)
    try:
        rendered = [model.tokenize(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n<think>\n")
                    for p in prompts]
        expected = [_generate(model, plain, None, p, n_tokens) for p in rendered]
        print(f"{name} ({path.name}): {len(prompts)} greedy replies, {sum(map(len, expected))} tokens, n_draft 3, "
              f"threads {args.threads}; {load()}", flush=True)
        seconds: dict[str, list[float]] = {label: [] for label in settings}
        same = dict.fromkeys(settings, True)
        counts = {}
        for round_ in range(max(args.rounds, 1)):
            order = list(settings)
            random.Random(round_).shuffle(order)
            for label in order:
                spec = settings[label]
                start = time.perf_counter()
                got = [_generate(model, plain if spec is None else ctx, spec, p, n_tokens) for p in rendered]
                seconds[label].append(time.perf_counter() - start)
                same[label] &= got == expected
                if spec is not None and label not in counts:
                    counts[label] = (spec.accepted, spec.drafted)
        unit = statistics.median(seconds["plain"])
        for label in settings:
            t = statistics.median(seconds[label])
            acc = (f"drafts accepted {counts[label][0]}/{counts[label][1]} = "
                   f"{counts[label][0] / max(counts[label][1], 1):.3f}" if label in counts else "")
            print(f"  {label:18} {1e3 * t:8.1f} ms  {unit / t:5.2f}x plain  {acc:34} tokens "
                  f"{'identical' if same[label] else 'DIFFERENT'} to plain decoding", flush=True)
        print(f"  after: {load()}", flush=True)
    finally:
        for spec in settings.values():
            if spec is not None:
                spec.close()
        ctx.close()
        plain.close()
        model.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny", "0.8b", "4b"])
    ap.add_argument("--model", help="a GGUF with its MTP block (instead of --size)")
    ap.add_argument("--vocab", default="16384,32768,65536", help="draft vocabulary sizes K, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--acceptance", default="", help="also measure acceptance on: tiny (the controlled fixture), "
                    "demo (the trained demo model); comma-separated")
    ap.add_argument("--no-cost", action="store_true", help="only the acceptance")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/mtp"))
    args = ap.parse_args()
    args.vocab = [int(k) for k in args.vocab.split(",") if k]
    if not args.no_cost:
        costs(model_path(args), args)
    for which in filter(None, args.acceptance.split(",")):
        if which == "demo":
            sys.path.insert(0, str(REPO))
            from tests.test_demo_model import build_demo_gguf

            acceptance("trained demo model", build_demo_gguf(), DEMO_PROMPTS, args)
        else:
            acceptance("controlled fixture, acceptance 0.8", model_path(argparse.Namespace(**{**vars(args),
                       "model": None, "size": which})), [PROMPT.split("\n")[1]], args, n_tokens=160)


if __name__ == "__main__":
    main()
