"""Splitting a Qwen3.5 reply into reasoning and answer, spotting reasoning that goes in circles, and
reading the template's XML tool calls out of the answer."""

from __future__ import annotations

import codecs
import json
import re
from collections import Counter, deque
from dataclasses import dataclass

REASONING, CONTENT = "reasoning", "content"


@dataclass(frozen=True)
class Piece:
    """A bit of a streamed reply: `kind` is "reasoning", "content" or "notice" (a message from the
    runtime itself, e.g. that the reasoning was cut short)."""

    kind: str
    text: str


class ReplySplitter:
    """Turns generated tokens into reasoning and content text as they arrive.

    The template's generation prompt already opened `<think>` when thinking is on, so the reply
    starts in the reasoning; the `</think>` token switches to the answer. The blank lines the model
    puts around each part are the template's layout, not text, and are left out (as the template
    itself strips them when it renders a past turn).
    """

    def __init__(self, starts_in_reasoning: bool, think_open: int | None, think_close: int | None) -> None:
        self.kind = REASONING if starts_in_reasoning else CONTENT
        self._open, self._close = think_open, think_close
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


_TOOL_CALL = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def split_tool_calls(content: str) -> tuple[str, list[dict]]:
    """(content without tool calls, [{"name", "arguments"}]) from the template's XML call format.
    Argument values that are JSON (numbers, lists, objects) are decoded, as the template encodes them."""
    calls = []
    for match in _TOOL_CALL.finditer(content):
        arguments = {}
        for name, value in _PARAMETER.findall(match.group(2)):
            try:
                arguments[name.strip()] = json.loads(value)
            except ValueError:
                arguments[name.strip()] = value
        calls.append({"name": match.group(1).strip(), "arguments": arguments})
    return (_TOOL_CALL.sub("", content).strip() if calls else content), calls
