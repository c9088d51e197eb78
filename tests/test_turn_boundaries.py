"""Where the next prompt will part from this one (conversation/boundaries.py): what a server renders
ahead while its client runs the tools gives exactly the boundaries that rendering the request's
stand-ins gives, and anything but the foreseen request is rendered as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen35.runtime.conversation.boundaries import HOLE, TurnBoundaries
from qwen35.runtime.conversation.template import ChatTemplate
from qwen35.runtime.conversation.tools import prepare_messages

TEMPLATE = (Path(__file__).resolve().parents[1] / "demo" / "chat_template.jinja").read_text()  # Qwen3.5's
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_0", "content": '{"city": "Oslo", "temperature": 4}'}


class Counted:
    """The template, counting its renderings; text cells one per character (what is compared is where
    two renderings part, in any unit)."""

    def __init__(self) -> None:
        self.template = ChatTemplate(TEMPLATE)
        self.template._remembers = False  # (every rendering counted)
        self.renders = 0

    def render(self, conversation, **how):
        self.renders += 1
        return self.template.render(conversation, **how)

    @staticmethod
    def cells(text, conversation):
        return [ord(c) for c in text]

    def boundaries(self) -> TurnBoundaries:
        return TurnBoundaries(self.render, self.cells)


def rendered(conversation, think, tools=TOOLS):
    """What `of` is given: the prompt and its text, as the session renders it."""
    text = ChatTemplate(TEMPLATE).render(conversation, add_generation_prompt=True, think=think, tools=tools)
    return [ord(c) for c in text], text


def by_rendering(conversation, think):
    t = Counted()
    found = t.boundaries().of(conversation, TOOLS, *rendered(conversation, think))
    assert t.renders == 2  # the two stand-ins
    return found


def after_foresight(before, request, think=False, tools=TOOLS, foreseen_with=None):
    """What `of` gives `request` (with `tools` and `think`) once `before` was foreseen (with the same,
    or `foreseen_with`: (tools, think)), and how many renderings it made for it."""
    t = Counted()
    b = t.boundaries()
    b.foresee(before, *(foreseen_with or (tools, think)))
    t.renders = 0
    return b.of(request, tools, *rendered(request, think, tools)), t.renders


@pytest.mark.parametrize("think", [False, True, None])
@pytest.mark.parametrize("reply, following", [
    (CALL, RESULT),                                                          # a tool's result
    ({"role": "assistant", "content": "It is 4 degrees."}, {"role": "user", "content": "And Lima?"}),  # a question
])
def test_the_foreseen_request_gets_the_boundaries_rendering_gives_without_rendering(think, reply, following):
    before = prepare_messages([{"role": "user", "content": "Weather in Oslo?"}, reply])
    request = before + prepare_messages([following])
    found, renders = after_foresight(before, request, think)
    assert found == by_rendering(request, think)
    assert renders == 0


def changed_history(before):
    return [{**before[0], "content": "Weather in Bergen?"}] + before[1:]


@pytest.mark.parametrize("unforeseen", [
    lambda before: changed_history(before) + [RESULT],                      # the client edited a message
    lambda before: before + [RESULT, {**RESULT, "content": "{}"}],          # two results
    lambda before: before + [{"role": "user", "content": "Thanks."}],       # a question, not the result
    lambda before: before + [{**RESULT, "content": f"a{HOLE}b"}],          # a text holding the placeholder
])
def test_any_other_request_is_rendered_as_before(unforeseen):
    before = prepare_messages([{"role": "user", "content": "Weather in Oslo?"}, CALL])
    request = prepare_messages(unforeseen(before))
    found, renders = after_foresight(before, request)
    assert found == by_rendering(request, False)
    assert renders == 2


def test_another_thinking_or_other_tools_is_rendered_as_before():
    before = prepare_messages([{"role": "user", "content": "Weather in Oslo?"}, CALL])
    request = before + prepare_messages([RESULT])
    for think, tools in ((True, TOOLS), (False, TOOLS + [{**TOOLS[0], "function": {**TOOLS[0]["function"],
                                                                                   "name": "get_time"}}])):
        _, renders = after_foresight(before, request, think, tools, foreseen_with=(TOOLS, False))
        assert renders == 2


def test_what_is_foreseen_serves_one_request():
    before = prepare_messages([{"role": "user", "content": "Weather in Oslo?"}, CALL])
    request = before + prepare_messages([RESULT])
    t = Counted()
    b = t.boundaries()
    b.foresee(before, TOOLS, False)
    b.of(request, TOOLS, *rendered(request, False))
    t.renders = 0
    b.of(request, TOOLS, *rendered(request, False))
    assert t.renders == 2


def test_a_conversation_holding_the_placeholder_is_not_foreseen():
    before = prepare_messages([{"role": "user", "content": f"What is {HOLE}?"}, CALL])
    request = before + prepare_messages([RESULT])
    found, renders = after_foresight(before, request)
    assert found == by_rendering(request, False)
    assert renders == 2


def test_a_template_that_refuses_the_guess_leaves_the_request_to_render_its_own():
    refusing = ChatTemplate("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}"
                            "{% endif %}{{ m.content }}{% endfor %}")
    b = TurnBoundaries(refusing.render, Counted.cells)
    b.foresee(prepare_messages([{"role": "user", "content": "Weather in Oslo?"}, CALL]), TOOLS, False)
    assert b._foreseen is None
