"""Where the next prompt will part from this one: the turn boundaries the state cache keeps.

The next turn brings a new message or the results of the tools called. Rendering this conversation
with a stand-in answer and a stand-in message (or tool result) after it, and comparing with this
prompt, says how many of its tokens the next prompt will start with. For Qwen3.5 they agree up to an
`<|im_start|>assistant\n` (the next rendering drops or rewrites the `<think>` block): after the last
user message's for a new message, this whole prompt for a tool result. A guess only: if the real
answer renders differently, the next turn notices (the checkpoint is not a prefix of its prompt) and
evaluates more, never something wrong.

Those two renderings cost more than the prompt's own (they hold two more messages), and they grow
with the conversation: 3.7 ms of an agent's eighth request, whose first token took 25 ms in process
on the demo model (AMD EPYC). A server knows most of the next request while its client runs the
tools: the conversation with the reply as clients send it back. So while it idles it renders them
with a placeholder where the next message's text goes (`foresee`); when that request comes, its
prompt — rendered anyway, exactly — is checked to be the foreseen one with the message's text in
the placeholder, and the stand-in renderings are taken the same way, in microseconds.
"""

from __future__ import annotations

from typing import Callable

from ..engine.errors import ChatError
from .prefill import common_prefix

ANSWER = {"role": "assistant", "content": "Answer."}
STAND_INS = ({"role": "user", "content": "Next."}, {"role": "tool", "content": "Result."})
# Where the next message's text goes in a foreseen rendering (once: a conversation holding it is not foreseen).
HOLE = "\x00qwen35: the next message\x00"


class TurnBoundaries:
    """`render(conversation, **how)`: the template's text; `cells(text, conversation)`: its context
    cells (the session's template and media)."""

    def __init__(self, render: Callable[..., str], cells: Callable[[str, list[dict]], list[int]]) -> None:
        self._render = render
        self._cells = cells
        # (the messages before the next one, the tools, the next message's role, the prompt, the stand-in
        # renderings), each text with HOLE for the next message's
        self._foreseen: tuple[int, list[dict], str, str, list[str]] | None = None

    def of(self, conversation: list[dict], tools: list[dict], prompt: list[int], prompt_text: str) -> set[int]:
        """How many of `prompt`'s tokens (the rendering `prompt_text` of `conversation`) the next
        turn's prompt will start with, after a new message and after tool results."""
        texts = self._recall(conversation, tools, prompt_text)
        if texts is None:
            texts = self._stand_ins(conversation, tools)
        return {common_prefix(prompt, self._cells(text, conversation + [ANSWER, following]))
                for text, following in zip(texts, STAND_INS)}

    def foresee(self, conversation: list[dict], tools: list[dict], think: bool | None) -> None:
        """Render ahead what `of` will need for the request that follows `conversation` (a reply as
        its client will send it back) with one more message: tool results after a reply that called
        tools, else a user message."""
        self._foreseen = None
        role = "tool" if conversation[-1].get("tool_calls") else "user"
        upcoming = conversation + [{"role": role, "content": HOLE}]
        try:
            prompt = self._render(upcoming, add_generation_prompt=True, think=think, tools=tools)
            texts = self._stand_ins(upcoming, tools)
        except ChatError:  # (a template that refuses the guess: the request renders its own)
            return
        if all(text.count(HOLE) == 1 for text in [prompt, *texts]):  # (a message holding it: not foreseen)
            self._foreseen = (len(conversation), tools, role, prompt, texts)

    def forget(self) -> None:
        self._foreseen = None

    def _stand_ins(self, conversation: list[dict], tools: list[dict]) -> list[str]:
        """`conversation` rendered with a stand-in answer and, after it, each stand-in of what follows."""
        return [self._render(conversation + [ANSWER, following], add_generation_prompt=False, think=None, tools=tools)
                for following in STAND_INS]

    def _recall(self, conversation: list[dict], tools: list[dict], prompt_text: str) -> list[str] | None:
        """The stand-in renderings of `conversation`, if it is the foreseen one with one more message:
        its prompt is the foreseen prompt with that message's text in the placeholder. (The prompt
        stands for the conversation and its thinking — a client sends the reply back in its own shape:
        ids, an empty content or none, which the template renders alike; the stand-ins also take the
        tools, compared as such.)"""
        foreseen, self._foreseen = self._foreseen, None  # (good for one request)
        if foreseen is None:
            return None
        count, foreseen_tools, role, prompt, texts = foreseen
        last = conversation[-1]
        text = last.get("content")
        if len(conversation) != count + 1 or last.get("role") != role or not isinstance(text, str) \
                or HOLE in text or tools != foreseen_tools or prompt.replace(HOLE, text) != prompt_text:
            return None
        return [t.replace(HOLE, text) for t in texts]
