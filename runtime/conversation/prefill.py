"""Evaluating the next prompt's known start while nothing waits: the user reads and types, the tools run.

After a reply, the start of the next prompt is already known: the reply as the template renders it
again, and the next turn's opening (a user turn, or the tool results after a reply that called
tools). A chat evaluates it in a background thread; a server, whose next request may belong to
another conversation, evaluates its guess of it between requests, in small steps that a waiting
request stops (ChatSession.idle). What was evaluated this way is counted as the next prompt's work
(prompt_tokens), not as reuse, when that prompt uses it.
"""

from __future__ import annotations

import threading
from typing import Callable

from ..engine.decoder import Decoder
from ..engine.errors import ChatError

# A server's prefill between requests evaluates this many tokens per decode, so that a request
# arriving meanwhile waits for at most one such step (2 cores: 0.8B ~60 ms on the AMD EPYC,
# 110-125 ms on the Intel Xeon; 4B ~250 ms), not for the whole guess.
PREFILL_STEP = 8
MAX_PREFILLS_KEPT = 16  # prefills remembered for the accounting (prompt_tokens vs cached_tokens)


class Prefill:
    """The prefill of one session. `render_cells(conversation, **how)` renders a conversation into
    context cells (the session's template and media)."""

    def __init__(self, decoder: Decoder, render_cells: Callable[..., list[int]], enabled: bool) -> None:
        self._decoder = decoder
        self._render_cells = render_cells
        self.enabled = enabled
        self._thread: threading.Thread | None = None
        # Recent prefills, by the tokens held at their end: where their evaluation started. Kept per
        # conversation (a server's turns interleave), until a prompt uses one.
        self.done: dict[tuple[int, ...], int] = {}
        self.guess: tuple[list[dict], list[dict]] | None = None  # respond()'s next prompt start, for idle()

    def start(self, conversation: list[dict], tools: list[dict]) -> None:
        """`run` for a recorded conversation, in a background thread."""
        self._decoder.stop.clear()
        self._thread = threading.Thread(target=self.run, args=(conversation, tools), name="qwen35-prefill")
        self._thread.start()

    def run(self, conversation: list[dict], tools: list[dict], *, guess: bool = False,
            busy: Callable[[], bool] | None = None) -> None:
        """Evaluate the start of the next prompt that is already known: the tokens every next
        message's rendering shares (found by rendering two different ones) — a user message's, or
        the tool results' after a reply that called tools. That is the last reply as the template
        renders it again (before a user message Qwen3.5's template drops the turn's think block, so
        the turn is evaluated again from its boundary before it) and the next turn's opening.

        `guess`: the conversation's last turn is only what the client will probably send back (a
        server's). Before tool results the template keeps the turn as written, and a client that
        sends the reasoning back goes on from the state as the model left it: then the guess is
        evaluated only where it goes on from that state too, never in its place. (Before a user
        message the state as left serves no next prompt; the checkpoints that do stay reachable.)
        `busy`: stop between steps of PREFILL_STEP tokens when it says a request waits."""
        decoder = self._decoder
        following = "tool" if conversation[-1].get("tool_calls") else "user"
        try:
            a, b = (self._render_cells(conversation + [{"role": following, "content": text}],
                                       add_generation_prompt=False, think=None, tools=tools)
                    for text in ("A.", "B?"))
            known = a[:common_prefix(a, b)]
            held = decoder.cache.tokens
            if not known or len(known) >= decoder.n_ctx - 1 \
                    or guess and following == "tool" and known[:len(held)] != held:
                return
            start = decoder.reuse(known, need_logits=False)
            # (stops early if interrupted, or when a request waits)
            decoder.evaluate(known[start:], logits=False, stop=busy, step=PREFILL_STEP if busy else None)
            if len(decoder.cache.tokens) > start:
                self.done[tuple(decoder.cache.tokens)] = start
                while len(self.done) > MAX_PREFILLS_KEPT:
                    del self.done[next(iter(self.done))]
        except ChatError:
            pass  # (an image it cannot show: the next turn says so; the state stays consistent)

    def settle(self) -> None:
        """Wait for the prefill: the llama.cpp context is used by one thread at a time."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def ahead(self, prompt: list[int], reused: int) -> int:
        """How many of the `reused` tokens of `prompt` a prefill evaluated for it: work for this
        prompt, not reuse (when they are this prompt's: a server's guess may have been another)."""
        for key, first in list(self.done.items()):
            if reused >= len(key) > first and tuple(prompt[:len(key)]) == key:
                del self.done[key]
                return len(key) - first
        return 0

    def forget(self) -> None:
        self.done = {}
        self.guess = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
