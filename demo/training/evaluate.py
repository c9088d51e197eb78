"""Held-out accuracy of the demo model, greedy, through qwen35's ChatSession on a converted GGUF.

For each held-out conversation of corpus.py (names, values, phrasings and images never trained on):
- tools: the model's calls (name + arguments, parsed by the runtime) equal the expected ones;
  its final answer, after the tool results, states the results (values copied from them);
- facts: the reply names the capital (asked the other way, the country); JSON: the reply parses to the expected object;
- images: the reply names the shape's colour and kind; counts: the number word;
- greeting: the reply introduces qwen35-demo.
Thinking on and off alternate over the held-out set. The tool results given back are the held-out
ones when the model called right, else computed for the model's own call (so an answer is always
checked against what its tools returned).

    python -m demo.training.evaluate MODEL.gguf [--limit N] [--kinds image,count] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

from . import corpus as C


def _norm_args(args: dict) -> dict:
    out = {}
    for k, v in args.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = float(v)
        elif isinstance(v, str):
            try:
                f = float(v)
                v = f
            except ValueError:
                v = v.strip()
        out[k] = v
    return out


def _calls(reply) -> list[tuple[str, dict]]:
    out = []
    for c in reply.tool_calls:
        fn = c["function"]
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"_unparsed": args}
        out.append((fn.get("name"), args))
    return out


def _execute(name: str, args: dict, rng: random.Random) -> dict:
    """The toy tools, for calls that differ from the expected ones."""
    try:
        if name == "get_weather":
            return C._weather_result(rng, str(args.get("city")), args.get("unit", "celsius"))
        if name == "convert_currency":
            return C._convert_result(args["amount"], str(args["from"]), str(args["to"]))  # 120 stays 120
        if name == "add_to_shopping_list":
            items = list(args["items"])
            return {"added": items, "total_items": len(items) + 3}
    except (KeyError, ValueError, TypeError):
        pass
    return {"error": "bad arguments"}


def _mentions_result(text: str, result: dict) -> bool:
    """The answer states the tool result's values."""
    t = text.replace(",", "")
    if "temperature" in result:
        return (re.search(rf"(?<!\d){result['temperature']}°", text) is not None and result["condition"] in text
                and result["city"] in text)
    if "result" in result:
        return C._fmt_num(result["result"]) in t
    if "added" in result:
        return all(i in text for i in result["added"]) and str(result["total_items"]) in text
    return False


def evaluate(gguf: Path, limit: int | None = None, verbose: bool = False, threads: int = 2,
             kinds: list[str] | None = None) -> dict:
    from qwen35.runtime import ChatSession

    held = [s for s in C.heldout(0) if not kinds or s.kind in kinds]
    if limit:
        by = defaultdict(list)
        for s in held:
            by[s.kind].append(s)
        held = [s for k in by for s in by[k][:limit]]
    rng = random.Random(7)
    score = defaultdict(lambda: [0, 0])
    failures = []
    t0 = time.time()
    with ChatSession(str(gguf), n_ctx=2048, threads=threads, temp=0.0, prefill=False, adapt_threads=False,
                     max_tokens=160) as chat:
        def mark(metric, ok, s, got):
            score[metric][0] += bool(ok)
            score[metric][1] += 1
            score[f"{metric} (think {'on' if s.think else 'off'})"][0] += bool(ok)
            score[f"{metric} (think {'on' if s.think else 'off'})"][1] += 1
            if not ok:
                last_user = max(i for i, m in enumerate(s.messages) if m["role"] == "user")
                content = s.messages[last_user]["content"]
                prompt = content if isinstance(content, str) else content[-1]["text"]
                failures.append({"metric": metric, "kind": s.kind, "think": s.think, "prompt": prompt[:120],
                                 "want": s.answer.get("final") or s.answer.get("capital") or s.answer.get("json")
                                 or s.answer.get("count") or s.answer.get("colour", "") + " " + s.answer.get("shape", ""),
                                 "got": got})

        for s in held:
            chat.reset()
            chat.think = s.think
            if s.tools:
                msgs = s.messages
                last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
                if last_user:
                    chat.restore(msgs[:last_user], think=s.think)
                r = chat.send(msgs[last_user]["content"], tools=C.TOOLS)
                got = _calls(r)
                want = s.answer["calls"]
                ok = len(got) == len(want) and all(
                    gn == wn and _norm_args(ga) == _norm_args(wa) for (gn, ga), (wn, wa) in zip(got, want))
                mark("tool call", ok, s, {"calls": got, "content": r.content})
                if not got:
                    mark("answer from tool result", False, s, r.content)
                    continue
                results = s.answer["results"] if ok else [_execute(n, a, rng) for n, a in got]
                r2 = chat.send([{"role": "tool", "content": json.dumps(res)} for res in results], tools=C.TOOLS)
                ok2 = all(_mentions_result(r2.content, res) for res in results) and not r2.tool_calls
                mark("answer from tool result", ok2, s, r2.content)
                continue
            content = s.messages[0]["content"]
            if isinstance(content, list):
                r = chat.send(content[1]["text"], images=s.images)
            else:
                r = chat.send(content)
            text = r.content
            if s.kind == "fact":
                mark("fact", s.answer["capital"] in text, s, text)
            elif s.kind == "fact_json":
                try:
                    ok = json.loads(text) == s.answer["json"]
                except ValueError:
                    ok = False
                mark("fact (JSON)", ok, s, text)
            elif s.kind == "fact_reverse":
                mark("fact (reverse)", s.answer["country"] in text, s, text)
            elif s.kind == "greeting":
                mark("greeting", C.MODEL_NAME in text, s, text)
            elif s.kind == "image":
                words = re.findall(r"[a-z]+", text.lower())
                mark("image colour+shape", s.answer["colour"] in words and s.answer["shape"] in words, s, text)
                mark("image background", s.answer["background"] in words, s, text)
            elif s.kind == "count":
                mark("image count", C.NUMBER_WORDS[s.answer["count"]] in re.findall(r"[a-z]+", text.lower()), s, text)
            if verbose:
                print(s.kind, repr(text)[:100], flush=True)
    table = {k: {"correct": v[0], "total": v[1], "accuracy": round(v[0] / v[1], 3)} for k, v in sorted(score.items())}
    return {"model": str(gguf), "heldout_conversations": len(held), "seconds": round(time.time() - t0, 1),
            "scores": table, "failures": failures[:60]}


def mtp_acceptance(gguf: Path, n: int = 30, threads: int = 2, draft_tokens: int = 2, draft_vocab: int = 0) -> dict:
    """Natural acceptance of the trained MTP head: greedy replies to held-out prompts (facts, greetings,
    tool calls) with speculative="mtp", checked identical to plain greedy decoding. `draft_vocab`: the
    drafts' vocabulary (0: the whole, the head's own acceptance; DRAFT_VOCAB: the runtime's default)."""
    from qwen35.runtime import ChatSession

    held = C.heldout(0)
    picks = [s for s in held if s.kind in ("fact", "greeting", "weather", "convert", "shop", "fact_json")][:n]
    out = {"drafted": 0, "accepted": 0, "identical": 0, "prompts": len(picks), "draft_tokens": draft_tokens,
           "draft_vocab": draft_vocab}
    replies = []
    opts = dict(n_ctx=2048, threads=threads, temp=0.0, prefill=False, adapt_threads=False, max_tokens=120)
    with ChatSession(str(gguf), **opts) as plain:
        for s in picks:
            plain.reset()
            r = plain.send(s.messages[0]["content"], tools=s.tools, think=s.think)
            replies.append((r.reasoning, r.content, _calls(r)))
    with ChatSession(str(gguf), speculative="mtp", draft_tokens=draft_tokens, draft_vocab=draft_vocab, **opts) as spec:
        out["warnings"] = spec.warnings
        for s, want in zip(picks, replies):
            spec.reset()
            r = spec.send(s.messages[0]["content"], tools=s.tools, think=s.think)
            out["identical"] += (r.reasoning, r.content, _calls(r)) == want
            out["drafted"] += r.stats.get("drafted_tokens", 0) or 0
            out["accepted"] += r.stats.get("accepted_tokens", 0) or 0
    out["acceptance"] = round(out["accepted"] / out["drafted"], 3) if out["drafted"] else None
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="held-out conversations per kind")
    ap.add_argument("--kinds", default="", metavar="KIND,...", help="only these kinds of conversation (corpus.KINDS)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--mtp", action="store_true", help="also measure the MTP head's natural acceptance")
    ap.add_argument("--skip-tasks", action="store_true", help="only the MTP measurement")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        C.check_kinds(kinds)
    except ValueError as e:
        raise SystemExit(f"--kinds: {e}") from None
    if not args.gguf.is_file():
        raise SystemExit(f"error: {args.gguf} does not exist")
    res = {"scores": {}} if args.skip_tasks else evaluate(args.gguf, args.limit, args.verbose, args.threads, kinds)
    if args.mtp:
        res["mtp"] = mtp_acceptance(args.gguf, threads=args.threads)
        from qwen35.runtime.engine.speculative import DRAFT_VOCAB

        res["mtp_reduced"] = mtp_acceptance(args.gguf, threads=args.threads, draft_vocab=DRAFT_VOCAB)
        for key in ("mtp", "mtp_reduced"):
            print(f"{key}:", {k: v for k, v in res[key].items() if k != "warnings"}, res[key]["warnings"] or "")
    for k, v in res["scores"].items():
        if "(think" not in k:
            print(f"{k:28s} {v['correct']:4d}/{v['total']:<4d} {100 * v['accuracy']:.1f}%")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
