"""The tool-call reader (runtime.tools.ToolCallReader) on generated text, cut at generated places.

Text is built from the pieces a model writes around calls (the template's tags, tool and parameter
names, values with `<`, quotes, newlines, JSON, non-ASCII) and from arbitrary characters, so that
well-formed calls, broken ones, nested tags and plain noise all come up. Seeded (derandomized): the
same examples on every run. For every text and every way of cutting it into streamed pieces:
- feeding and finishing never raise;
- the pieces of each call's arguments, joined, are exactly json.dumps of its final arguments
  (which parse back to them), and every call starts, gets its arguments, and ends, in that order;
- the content events joined are the reader's content, with no part of a call tag in it unless the
  text that held it was no call;
- what comes out does not depend on where the text was cut: the same content and the same calls
  as the whole text fed at once.
"""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qwen35.runtime.conversation.tools import ToolCallReader  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"}, "limit": {"type": "integer"}, "exact": {"type": "boolean"},
    "filters": {"type": "object"}, "note": {"type": ["string", "null"]}}}}},
         {"type": "function", "function": {"name": "ping"}}]

PIECES = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", ">", "\n", "\n\n",
          " ", "search", "ping", "query", "limit", "exact", "filters", "note", "other", "=", "<", "</", "/", "<tool",
          "_call>", "<function", "<param", "</para", "3", "-7", "true", "null", '{"a": [1, "x<y"]}', '"', "\\", "{",
          "a < b", "x</p>", "cats", "héllo ✓", "\t", "<think>", "</think>"]


@st.composite
def calls_and_noise(draw) -> str:
    """Text around calls: well-formed calls (some cut short, some with a tag missing), mixed with
    the template's pieces in random order and with arbitrary text."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["call", "pieces", "text"]))
        if kind == "call":
            name = draw(st.sampled_from(["search", "ping", "other", "", "se arch"]))
            params = draw(st.lists(st.tuples(
                st.sampled_from(["query", "limit", "exact", "filters", "note", "x"]),
                st.one_of(st.sampled_from(["3", "true", "null", '{"k": 1}', "a < b", "x</p>", "", "\n"]),
                          st.text(max_size=12))), max_size=3))
            body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
            call = f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"
            if draw(st.booleans()):  # damaged: cut short, or a piece of it dropped
                cut = draw(st.integers(0, len(call)))
                call = call[:cut] if draw(st.booleans()) else call[:cut] + call[cut + draw(st.integers(1, 12)):]
            parts.append(call)
        elif kind == "pieces":
            parts.append("".join(draw(st.lists(st.sampled_from(PIECES), max_size=12))))
        else:
            parts.append(draw(st.text(max_size=20)))
    return "".join(parts)


def _cuts(draw_text: str, sizes: list[int]) -> list[str]:
    pieces, i = [], 0
    for size in sizes:
        if i >= len(draw_text):
            break
        pieces.append(draw_text[i:i + size])
        i += size
    if i < len(draw_text):
        pieces.append(draw_text[i:])
    return pieces


def read(pieces: list[str]):
    """(events, reader) after feeding `pieces` and finishing."""
    reader = ToolCallReader(TOOLS)
    events = []
    for piece in pieces:
        events += reader.feed(piece)
    events += reader.finish()
    return events, reader


def check_events(events, reader) -> None:
    calls, arguments, open_call = [], [], None
    for kind, value in events:
        if kind == "call_start":
            assert open_call is None, events
            open_call = value["id"]
            arguments.append("")
        elif kind == "arguments":
            assert open_call is not None, events
            arguments[-1] += value
        elif kind == "call":
            assert value["id"] == open_call, events
            calls.append(value)
            open_call = None
        else:
            assert kind == "content" and isinstance(value, str) and value, events
    assert open_call is None, "a call was started and never ended"
    assert calls == reader.calls
    for joined, call in zip(arguments, calls):
        assert joined == json.dumps(call["function"]["arguments"], ensure_ascii=False), (joined, call)
        assert json.loads(joined) == call["function"]["arguments"]
    assert "".join(v for k, v in events if k == "content") == "".join(reader.content)


def _summary(events, reader):
    return "".join(reader.content), [c["function"] for c in reader.calls], reader.cut_off


SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=400,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(text=calls_and_noise(), sizes=st.lists(st.integers(1, 16), max_size=40))
def test_streamed_calls_are_read_the_same_whatever_the_cuts(text, sizes):
    whole_events, whole = read([text])
    check_events(whole_events, whole)
    events, reader = read(_cuts(text, sizes))
    check_events(events, reader)
    assert _summary(events, reader) == _summary(whole_events, whole), (text, _cuts(text, sizes))


@SETTINGS
@given(text=st.text(max_size=200), sizes=st.lists(st.integers(1, 8), max_size=60))
def test_arbitrary_text_never_raises(text, sizes):
    events, reader = read(_cuts(text, sizes))
    check_events(events, reader)
    assert _summary(events, reader) == _summary(*read([text]))


@SETTINGS
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=40), sizes=st.lists(st.integers(1, 5), max_size=80))
def test_the_templates_pieces_in_any_order_never_raise(pieces, sizes):
    text = "".join(pieces)
    events, reader = read(_cuts(text, sizes))
    check_events(events, reader)
    assert _summary(events, reader) == _summary(*read([text]))
