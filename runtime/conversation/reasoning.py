"""Splitting a Qwen3.5 reply into reasoning and answer, spotting reasoning that goes in circles, and
stopping at the caller's stop strings. (Tool calls are read out of the answer in tools.py.)"""

from __future__ import annotations

import codecs
from collections import Counter, deque
from dataclasses import dataclass

REASONING, CONTENT = "reasoning", "content"
TOOL_CALL_START, TOOL_CALL_ARGUMENTS, TOOL_CALL = "tool_call_start", "tool_call_arguments", "tool_call"


@dataclass(frozen=True)
class Piece:
    """A bit of a streamed reply: `kind` is
      "reasoning", "content"    text;
      "tool_call_start"         a tool call begins: `call` is {"id", "type", "function": {"name"}};
      "tool_call_arguments"     `text` is the next piece of that call's arguments as JSON text (the
                                pieces joined are the call's arguments, `json.dumps`ed);
      "tool_call"               the call is complete: `call` is {"id", "type", "function": {"name",
                                "arguments": {...}}};
      "notice"                  a message from the runtime itself (e.g. that the reasoning was cut short).
    """

    kind: str
    text: str
    call: dict | None = None


class ReplySplitter:
    """Turns generated tokens into reasoning and content text as they arrive.

    The template's generation prompt already opened `<think>` when thinking is on, so the reply
    starts in the reasoning; the `</think>` token switches to the answer. The blank lines the model
    puts around each part are the template's layout, not text, and are left out (as the template
    itself strips them when it renders a past turn). A `<tool_call>` token inside the reasoning
    ends it too: a model that forgot `</think>` is calling a tool.
    """

    def __init__(self, starts_in_reasoning: bool, think_open: int | None, think_close: int | None,
                 tool_call: int | None = None) -> None:
        self.kind = REASONING if starts_in_reasoning else CONTENT
        self._open, self._close, self._tool_call = think_open, think_close, tool_call
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True  # still skipping the part's leading blank lines
        self.text = {REASONING: [], CONTENT: []}

    def feed(self, token: int, piece: bytes) -> Piece | None:
        if token == self._close and self.kind == REASONING:
            self._switch(CONTENT)
            return None
        if token == self._open and self.kind == CONTENT and not self.text[CONTENT]:
            self._switch(REASONING)  # a model that opens its reasoning itself
            return None
        if token == self._tool_call and self.kind == REASONING:
            self._switch(CONTENT)
        text = self._decoder.decode(piece)
        if self._at_start:
            text = text.lstrip("\n")
            if not text:
                return None
            self._at_start = False
        self.text[self.kind].append(text)
        return Piece(self.kind, text)

    def close_reasoning(self) -> None:
        """The runtime closed the reasoning itself (see RepetitionGuard)."""
        self._switch(CONTENT)

    def _switch(self, kind: str) -> None:
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self.text[self.kind].append(tail)
        self._decoder.reset()
        self.kind, self._at_start = kind, True

    def result(self) -> tuple[str, str]:
        """(reasoning, content), trimmed the way the chat template trims them."""
        self._switch(self.kind)
        return "".join(self.text[REASONING]).strip(), "".join(self.text[CONTENT]).strip()


class RepetitionGuard:
    """Notices text that repeats itself: the same `n`-token sequence seen `times` times.

    Small models (and random ones) can reason forever in a loop; a sentence that comes back word
    for word four times is not going anywhere.
    """

    def __init__(self, n: int = 16, times: int = 4) -> None:
        self.n, self.times = n, times
        self._window: deque[int] = deque(maxlen=n)
        self._seen: Counter[tuple[int, ...]] = Counter()

    def looping(self, token: int) -> bool:
        self._window.append(token)
        if len(self._window) < self.n:
            return False
        gram = tuple(self._window)
        self._seen[gram] += 1
        return self._seen[gram] >= self.times

    def reset(self) -> None:
        self._window.clear()
        self._seen.clear()


class StopStrings:
    """Ends the answer at the first of the caller's stop strings; text that might be the start of
    one is held back until the next piece tells. `reached` is the stop string that ended it."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = [s for s in stops or [] if s]
        self._held = ""
        self.reached: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is surely answer, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        text = self._held + text
        hits = [(i, s) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            at, self.reached = min(hits, key=lambda hit: hit[0])
            return text[:at], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text
