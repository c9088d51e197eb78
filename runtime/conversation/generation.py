"""The token loop of one reply: sample, check, evaluate, with or without the MTP head's drafts.

It turns the decoder's tokens into the reply's pieces (reasoning and answer text, split by
reasoning.ReplySplitter) and decides when the reply ends: the model's end of generation,
max_tokens, a full context, an interrupt, a loop. What the answer means (tool calls, stop strings)
is read above it, by the session's turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..engine import native
from ..engine.decoder import Decoder, Verified
from ..engine.native import Sampling
from .constraints import Constraint
from .reasoning import REASONING, Piece, RepetitionGuard, ReplySplitter


@dataclass(frozen=True)
class Request:
    """What one reply is asked for, besides the conversation."""

    tools: list[dict]
    think: bool | None
    max_tokens: int | None
    sampling: Sampling
    constraint: Constraint | None = None
    stop: tuple[str, ...] = ()
    read_tool_calls: bool = True
    # False (a client's `parallel_tool_calls: false`): the reply ends with its first complete tool
    # call, under any tool_choice (a grammar holds a required call to one; `auto` has none).
    parallel_tool_calls: bool = True
    # As llama-bench generates: the reply runs to max_tokens, neither an end-of-generation token nor
    # a repetition ends it (`qwen35 bench`, so that its figures count the tokens llama-bench's do).
    exact_length: bool = False


def generate(decoder: Decoder, sampler: native.Sampler, request: Request, splitter: ReplySplitter, stats: dict,
             notices: list[str], start: float, keep_prompt_state: Callable[[], list[int]]):
    """The reply's pieces as they are sampled; returns why it ended. `keep_prompt_state` is
    called once the first token is out, before anything else is evaluated; what it returns is
    evaluated again first.

    With speculation, one step evaluates the last token and the MTP head's drafts and samples
    every row while the samples match the drafts (Speculator.step); those tokens then go
    through the same checks, one at a time, as plainly decoded ones. The model keeps what a
    plain decoding would hold at the token being looked at (Decoder.keep): the reply may end
    at any of them (end of generation, max_tokens, a stop string, an interrupt, a loop)."""
    max_tokens = request.max_tokens
    guard = RepetitionGuard()
    token = sampler.sample(decoder.ctx)
    first = time.perf_counter()
    stats["ttft_s"] = first - start
    n = 0
    again: list[int] | None = None  # prompt tokens to evaluate again, once keep_prompt_state ran
    verified: Verified | None = None  # the last speculative step, while its tokens are looked at
    # That step's (drafts, right, seconds): told to the policy once the step is over, its roll-back
    # (in Decoder.keep) timed too, as a drafting step's cost includes it.
    timed: tuple[int, int, float | None] | None = None

    def step_over(keep_from: float) -> None:
        nonlocal timed
        if timed is not None:
            n_draft, right, seconds = timed
            decoder.policy.record(n_draft, right, None if seconds is None else
                                  seconds + time.perf_counter() - keep_from)
            timed = None
    drafted, accepted = (decoder.spec.drafted, decoder.spec.accepted) if decoder.spec else (0, 0)
    try:
        while True:
            if decoder.model.is_eog(token) and not request.exact_length:
                return "stop"
            n += 1
            stats["gen_tokens"] = n
            if splitter.kind == REASONING:  # (the `</think>` that ends it counts as reasoning)
                stats["reasoning_tokens"] += 1
            piece = splitter.feed(token, decoder.model.piece(token))
            if piece:
                yield piece
            pending = [token]
            if not request.exact_length and guard.looping(token):
                # Close the reasoning as the model would have, and let it answer; but not under a
                # grammar, which must see every token of the answer sampled.
                if splitter.kind != REASONING or request.constraint is not None:
                    notices.append("the reply kept repeating itself: stopped it")
                    yield Piece("notice", notices[-1])
                    return "loop"
                notices.append("the reasoning kept repeating itself: closed it to answer")
                yield Piece("notice", notices[-1])
                splitter.close_reasoning()
                guard.reset()
                pending += decoder.model.tokenize("\n</think>\n\n")
            if decoder.stop.is_set():
                return "interrupted"
            if max_tokens is not None and n >= max_tokens:
                return "length"
            held = len(decoder.cache.tokens) + (verified.kept if verified else 0)
            if held + len(pending) >= decoder.n_ctx:
                notices.append(f"context full ({decoder.n_ctx} tokens): /reset to start over, or raise --ctx-size")
                yield Piece("notice", notices[-1])
                return "context"
            if verified and len(pending) == 1 and verified.more():
                token = verified.next()  # sampled after the tokens before it, all evaluated
                continue
            step = time.perf_counter()
            verified = decoder.keep(verified)
            step_over(step)
            if again is None:
                again = keep_prompt_state()
            step = time.perf_counter()
            n_draft = min(decoder.policy.n_draft(), decoder.n_ctx - held - 1,
                          (max_tokens - n - 1) if max_tokens is not None else decoder.draft_tokens)
            if len(pending) == 1 and not again and n_draft > 0:
                holds = decoder.timing_holds()
                verified = decoder.draft_step(token, sampler, n_draft)
                token = verified.next()
                timed = (n_draft, len(verified.sampled) - 1, time.perf_counter() - step if holds else None)
            else:
                decoder.evaluate(again + pending, logits=True)
                token = sampler.sample(decoder.ctx)
                if len(pending) == 1 and not again:
                    seconds = time.perf_counter() - step
                    holds = decoder.timing_holds()
                    if decoder.governor:
                        decoder.governor.token_done(seconds)
                    decoder.policy.plain_step(seconds if holds else None)
            again = []
            elapsed = time.perf_counter() - first
            stats["gen_tps"] = n / elapsed if elapsed > 0 else None
    finally:
        step = time.perf_counter()
        decoder.keep(verified)
        step_over(step)
        if again is None:  # the reply ended at its first token: the state still ends the prompt
            again = keep_prompt_state()
            if again:
                decoder.evaluate(again, logits=False)
        if decoder.spec:
            stats["drafted_tokens"] = decoder.spec.drafted - drafted
            stats["accepted_tokens"] = decoder.spec.accepted - accepted

