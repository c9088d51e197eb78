"""`qwen35 bench`: prompt-processing and generation speed of the chat runtime, and its peak memory.

Measured the way llama-bench measures (random prompt tokens in 512-token batches for pp; one token
per step for tg, after a warm-up; exactly n tokens, as llama-bench, whatever the model writes), but
through the runtime's own code path: pp through the session's prompt evaluation, tg through a real
chat reply (native sampler chain, detokenizing, reasoning split).
Several thread counts are measured on one loaded model, switching between them with
llama_set_n_threads, so the sweep compares threads and nothing else. With the model's MTP head
(unless --no-mtp), tg is measured both ways on the same loaded model: plain, and drafting every
step (`tg_mtp`, with the share of drafts accepted).
"""

from __future__ import annotations

import json
import random
import statistics
import time

from ...system import peak_rss
from ..conversation.session import ChatSession
from ..engine import cpu, native
from ..engine.decoder import drafting_possible
from ..engine.modelfile import read_model_file
from ..engine.speculative import AUTO, DRAFT_VOCAB, MTP, OFF, staging_api


def bench(model: str, *, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3,
          threads: list[int] | None = None, n_ctx: int = 4096, force: bool = False, speculative: str | None = None,
          draft_tokens: int = 3, draft_vocab: int = DRAFT_VOCAB) -> dict:
    """One result per thread count (default: the session's own choice), and the fastest at generating.
    `speculative` None: both ways when the GGUF has an MTP head and this llama.cpp can run it."""
    if speculative is None:
        can_draft = drafting_possible(read_model_file(model), AUTO, draft_tokens) \
            and staging_api()[0] is not None
        speculative = MTP if can_draft else OFF
    with ChatSession(model, n_ctx=max(n_ctx, n_prompt + n_gen + 64), threads=threads[0] if threads else None,
                     seed=1, force=force, prefill=False, speculative=speculative, draft_tokens=draft_tokens,
                     draft_vocab=draft_vocab) as s:
        drafting = s.speculative != "off"
        rng = random.Random(0)
        # Ordinary tokens only (the special tokens sit at the end of the vocabulary).
        tokens = [rng.randrange(0, min(s.decoder.model.n_vocab, 240000)) for _ in range(n_prompt)]
        s.decoder.evaluate(tokens[:16], logits=True)  # warm-up: first-touch of the weights, thread pool
        runs = []
        for n in threads or [s.threads]:
            s.set_threads(n)
            runs.append(_measure(s, tokens, n_gen, repetitions, drafting))
        result = {
            "model": str(s.model_file.path), "n_ctx": s.n_ctx, "runs": runs, "peak_rss_bytes": peak_rss(),
            "cpu_features": cpu.features(),
            "extra_buffer_types": [name for name, _ in cpu.extra_buffers().original],
            "weights": s.decoder.model.placement, "file_mapped": s.decoder.model.mapped,
            "amx": {"on": s.decoder.model.amx.use_amx, "reason": s.decoder.model.amx.reason},
            "draft_tokens": s.draft_tokens, "warnings": s.warnings,
        }
    timed = [r for r in runs if r["tg"]["tps"]]
    result["fastest_threads"] = max(timed, key=lambda r: r["tg"]["tps"])["threads"] if timed else None
    return result


def _measure(s: ChatSession, tokens: list[int], n_gen: int, repetitions: int, drafting: bool) -> dict:
    pp = []
    if drafting:
        s.set_speculative("off")  # pp the way plain decoding does it (drafting also runs the MTP head over it)
    for _ in range(repetitions):
        s.reset()
        pp.append(_timed_tps(s, tokens))
    run = {"threads": s.threads, "pp": {"n": len(tokens), "tps": statistics.mean(pp), "stdev": _stdev(pp)},
           "tg": _generation(s, n_gen, repetitions)}
    if drafting:
        s.set_speculative("mtp")
        run["tg_mtp"] = _generation(s, n_gen, repetitions)
        s.set_speculative(OFF)
    return run


def _generation(s: ChatSession, n_gen: int, repetitions: int) -> dict:
    tg, gen_tokens, drafted, accepted = [], [], 0, 0
    s.send("Hi", max_tokens=8)  # warm-up (of this thread count's pool)
    for _ in range(repetitions):
        s.reset()
        reply = s.send("Write a long story about a lighthouse keeper.", max_tokens=n_gen, exact_length=True)
        if reply.stats["gen_tps"]:
            tg.append(reply.stats["gen_tps"])
            gen_tokens.append(reply.stats["gen_tokens"])
        drafted += reply.stats.get("drafted_tokens", 0)
        accepted += reply.stats.get("accepted_tokens", 0)
    result = {"n": min(gen_tokens, default=0), "tps": statistics.mean(tg) if tg else None, "stdev": _stdev(tg)}
    if s.speculative != "off":
        result["acceptance"] = accepted / drafted if drafted else None
    return result


def _timed_tps(s: ChatSession, tokens: list[int]) -> float:
    start = time.perf_counter()
    s.decoder.evaluate(tokens, logits=True)
    return len(tokens) / (time.perf_counter() - start)


def _stdev(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def format_markdown(result: dict) -> str:
    lines = ["| model | threads | test | tokens/s |", "| --- | ---: | --- | ---: |"]
    for run in result["runs"]:
        for name in ("pp", "tg", "tg_mtp"):
            r = run.get(name)
            if r is None:
                continue
            tps = f"{r['tps']:.2f} ± {r['stdev']:.2f}" if r["tps"] else "-"
            test = f"tg{r['n']} mtp (draft {result['draft_tokens']})" if name == "tg_mtp" else f"{name}{r['n']}"
            lines.append(f"| {result['model']} | {run['threads']} | {test} | {tps} |")
    lines.append("")
    for run in result["runs"]:
        mtp, tg = run.get("tg_mtp"), run["tg"]
        if mtp and mtp["tps"] and tg["tps"]:
            acceptance = f"{mtp['acceptance']:.2f}" if mtp["acceptance"] is not None else "-"
            lines.append(f"{run['threads']} threads: MTP {mtp['tps'] / tg['tps']:.2f}x plain decoding, "
                         f"drafts accepted {acceptance}")
    for warning in result["warnings"]:
        lines.append(f"warning: {warning}")
    if len(result["runs"]) > 1 and result["fastest_threads"]:
        lines.append(f"fastest generation: {result['fastest_threads']} threads")
    lines.append(f"peak memory: {result['peak_rss_bytes'] / 2**20:,.0f} MiB")
    lines.append(f"llama.cpp CPU features: {' '.join(result['cpu_features'])}")
    lines.append(native.weights_line(result["weights"], result["file_mapped"],
                                     (result["amx"]["on"], result["amx"]["reason"])))
    return "\n".join(lines)


def format_json(result: dict) -> str:
    return json.dumps(result, indent=2)
