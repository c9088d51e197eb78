"""ChatTemplate remembers its last rendering: a server renders each request as it arrives (to refuse
one that does not fit at once) and again as its turn's prompt, with the same variables."""

from __future__ import annotations

from pathlib import Path

from qwen35.runtime.conversation.template import ChatTemplate

QWEN = Path(__file__).resolve().parents[1] / "demo" / "chat_template.jinja"  # Qwen3.5's, as the demo ships it
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def counting(template: ChatTemplate) -> list[int]:
    calls = [0]
    inner = template._template.render

    def render(**variables):
        calls[0] += 1
        return inner(**variables)

    template._template.render = render
    return calls


def source() -> str:
    return QWEN.read_text()


def test_the_same_conversation_rendered_twice_is_rendered_once():
    t = ChatTemplate(source())
    calls = counting(t)
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    first = t.render(messages, add_generation_prompt=True, think=False, tools=TOOLS)
    again = t.render([dict(m) for m in messages], add_generation_prompt=True, think=False, tools=TOOLS)
    assert again == first and calls[0] == 1


def test_anything_different_is_rendered_anew():
    t = ChatTemplate(source())
    calls = counting(t)
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    base = t.render(messages, add_generation_prompt=True, think=False, tools=TOOLS)
    variants = [t.render(messages, add_generation_prompt=False, think=False, tools=TOOLS),
                t.render(messages, add_generation_prompt=True, think=None, tools=TOOLS),
                t.render(messages, add_generation_prompt=True, think=False)]
    messages[0]["content"] = "Weather in Lima?"  # the same list, changed in place
    variants.append(t.render(messages, add_generation_prompt=True, think=False, tools=TOOLS))
    assert calls[0] == 5
    assert "Lima" in variants[-1] and "Lima" not in base


def test_a_template_that_reads_the_clock_is_rendered_every_time():
    t = ChatTemplate("{{ strftime_now('%H:%M:%S.%f') }}{% for m in messages %}{{ m.content }}{% endfor %}")
    calls = counting(t)
    messages = [{"role": "user", "content": "What time is it?"}]
    t.render(messages, add_generation_prompt=True, think=None)
    t.render(messages, add_generation_prompt=True, think=None)
    assert calls[0] == 2
