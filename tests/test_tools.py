"""Reading Qwen3.5's XML tool calls, coercing their values by schema, and checking what clients send:
hand-made strings for every edge case (no model needed)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp")

from qwen35.runtime.engine.errors import ChatError  # noqa: E402
from qwen35.runtime.conversation.reasoning import ReplySplitter, StopStrings  # noqa: E402
from qwen35.runtime.conversation.tools import ToolCallReader, check_tools, coerce, prepare_messages, split_tool_calls  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}, "exact": {"type": "boolean"},
        "filters": {"type": "object"}, "sites": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"}, "note": {"type": ["string", "null"]}, "code": {"type": "string"}}}}}]


def call(name: str, **params: str) -> str:
    """A call exactly as the template writes it."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def functions(calls):
    return [c["function"] for c in calls]


def test_the_templates_own_format_is_read_exactly():
    text = "I will look.\n\n" + call("search", query="cats", limit="3")
    content, calls = split_tool_calls(text, TOOLS)
    assert content == "I will look."
    assert functions(calls) == [{"name": "search", "arguments": {"query": "cats", "limit": 3}}]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


def test_several_calls_each_with_its_own_id():
    text = call("search", query="a") + "\n" + call("search", query="b")
    content, calls = split_tool_calls(text, TOOLS)
    assert content == ""
    assert [c["function"]["arguments"]["query"] for c in calls] == ["a", "b"]
    assert len({c["id"] for c in calls}) == 2


def test_values_coerced_by_schema():
    text = call("search", query="42", limit="7", exact="true", filters='{"lang": "en"}', sites='["a.org", "b.org"]',
                score="0.5", note="null")
    _, calls = split_tool_calls(text, TOOLS)
    assert calls[0]["function"]["arguments"] == {"query": "42", "limit": 7, "exact": True, "filters": {"lang": "en"},
                                                 "sites": ["a.org", "b.org"], "score": 0.5, "note": None}


def test_coercion_rules():
    assert coerce("007", {"type": "string"}) == "007"  # strings raw, never decoded
    assert coerce("True", {"type": "boolean"}) is True  # how the template prints a Python bool
    assert coerce("not json", {"type": "integer"}) == "not json"  # undecodable: stays text
    assert coerce("3", None) == 3 and coerce("Paris", None) == "Paris"  # no schema: JSON if it is JSON
    assert coerce("null", {"type": "string"}) == "null"
    assert coerce("2", {"anyOf": [{"type": "integer"}, {"type": "null"}]}) == 2
    assert coerce("x", {"enum": ["x", "y"]}) == "x"


def test_values_holding_angle_brackets_and_newlines():
    code = "if a < b:\n    print('<b>')\n\n"
    _, calls = split_tool_calls(call("search", code=code, query="x</p>y"), TOOLS)
    assert calls[0]["function"]["arguments"] == {"code": code, "query": "x</p>y"}


def test_a_stray_closing_tag_and_a_missing_closing_tag_are_forgiven():
    doubled = "<tool_call>\n<function=search>\n<parameter=query>\ncats\n</parameter>\n</parameter>\n" \
              "<parameter=limit>\n2\n</parameter>\n</function>\n</tool_call>"
    assert functions(split_tool_calls(doubled, TOOLS)[1]) == [{"name": "search",
                                                               "arguments": {"query": "cats", "limit": 2}}]
    unclosed = "<tool_call>\n<function=search>\n<parameter=query>\ncats\n<parameter=limit>\n2\n</parameter>\n" \
               "</function>"  # no </parameter> for the first value, no </tool_call>
    assert functions(split_tool_calls(unclosed, TOOLS)[1]) == [{"name": "search",
                                                                "arguments": {"query": "cats", "limit": 2}}]


def test_a_call_cut_off_before_its_first_parameter_stays_content():
    text = "Looking.\n\n<tool_call>\n<function=search>"
    assert split_tool_calls(text, TOOLS) == (text, [])
    assert split_tool_calls("<tool_call>", TOOLS) == ("<tool_call>", [])
    assert split_tool_calls("a <tool_call> b", TOOLS) == ("a <tool_call> b", [])


def test_a_call_cut_off_later_keeps_what_was_written():
    """Once a call is sure to be one it is streamed, so a cut-off call is closed with what it holds:
    a string value as far as it was written, another value only if complete."""
    for text, arguments in [("<parameter=query>\nca", {"query": "ca"}),
                            ("<parameter=query>\ncats\n</param", {"query": "cats"}),
                            ("<parameter=limit>\n3\n</parameter>\n<parameter=query>\n", {"limit": 3, "query": ""}),
                            ("<parameter=query>\ncats\n</parameter>\n<parameter=limit>\n1", {"query": "cats"}),
                            ("<parameter=query>\ncats\n</parameter>\n</function>", {"query": "cats"})]:
        content, calls = split_tool_calls("Looking.\n\n<tool_call>\n<function=search>\n" + text, TOOLS)
        assert content == "Looking." and functions(calls) == [{"name": "search", "arguments": arguments}], text


def test_malformed_calls_never_raise_and_stay_content():
    for text in ("<tool_call>\n<function=>\n</function>\n</tool_call>",  # no name
                 "<tool_call>\nsearch(query='x')\n</tool_call>",  # not the format
                 "<tool_call>\n<function=search>\n<parameter=query\ncats</function>\n</tool_call>"):
        content, calls = split_tool_calls(text, TOOLS)
        assert calls == [] and content == text.strip()


def test_without_parallel_calls_the_answer_ends_with_its_first_call():
    """parallel_tool_calls false: the reader takes the first complete call and reads nothing after
    it (`done` tells the session to stop the reply there), however the text comes."""
    text = "Let me see.\n\n" + call("search", query="a") + "\n" + call("search", query="b") + "\nMore."
    for size in (1, 3, 7, len(text)):
        reader = ToolCallReader(TOOLS, parallel=False)
        events = []
        for i in range(0, len(text), size):
            events += reader.feed(text[i:i + size])
            if reader.done:
                break
        events += reader.finish()
        assert reader.done and [c["function"]["arguments"] for c in reader.calls] == [{"query": "a"}], size
        assert [e for e in events if e[0] == "call"] == [("call", reader.calls[0])]
        assert "".join(reader.content) == "Let me see." and not reader.cut_off
    two = call("search", query="a") + "\n" + call("search", query="b")
    without_close = two.replace("</tool_call>", "", 1)  # (a model that left out the first `</tool_call>`)
    for text in (two, without_close):
        reader = ToolCallReader(TOOLS, parallel=False)
        reader.feed(text)
        assert reader.done and len(reader.calls) == 1 and reader.finish() == []
    reader = ToolCallReader(TOOLS)  # parallel: every call, never done
    reader.feed(two)
    reader.finish()
    assert len(reader.calls) == 2 and not reader.done


def test_text_after_a_call_is_kept():
    content, calls = split_tool_calls(call("search", query="a") + "\nDone.", TOOLS)
    assert content == "Done." and len(calls) == 1


def test_streamed_pieces_give_the_same_answer_whatever_the_split():
    text = "Sure.\n\n" + call("search", query="a < b", limit="1") + "\n" + call("search", query="c")
    whole_content, whole_calls = split_tool_calls(text, TOOLS)
    for size in (1, 2, 3, 7, 11):
        reader = ToolCallReader(TOOLS)
        events = []
        for i in range(0, len(text), size):
            events += reader.feed(text[i:i + size])
        events += reader.finish()
        assert "".join(v for k, v in events if k == "content") == whole_content == "Sure."
        assert [v["function"] for k, v in events if k == "call"] == functions(whole_calls)
        # Nothing of a call is shown as text, not even the start of `<tool_call>`.
        assert all("<" not in v for k, v in events if k == "content")


def test_reading_can_be_switched_off():
    text = call("search", query="a")
    reader = ToolCallReader(TOOLS, enabled=False)
    events = reader.feed(text) + reader.finish()
    assert events == [("content", text)] and reader.calls == []


def test_a_missing_think_close_ends_the_reasoning_at_the_call():
    OPEN, CLOSE, CALL = 1, 2, 3
    s = ReplySplitter(True, OPEN, CLOSE, CALL)
    for token, piece in [(10, b"I should search."), (CALL, b"<tool_call>"), (11, b"\n<function=search>\n"),
                         (12, b"</function>\n"), (13, b"</tool_call>")]:
        s.feed(token, piece)
    reasoning, content = s.result()
    assert reasoning == "I should search."
    assert functions(split_tool_calls(content, TOOLS)[1]) == [{"name": "search", "arguments": {}}]


def test_stop_strings_hold_back_what_might_be_one():
    stop = StopStrings(["END", "\n\n"])
    assert stop.feed("Hello E") == ("Hello ", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("Dx") == ("", True)
    stop = StopStrings(["END"])
    assert stop.feed("abE") == ("ab", False)
    assert stop.feed("x") == ("Ex", False)
    assert stop.flush() == ""


def test_arguments_sent_as_json_strings_are_decoded_for_the_template():
    messages = prepare_messages([
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "cafe\u0301?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"query": "x"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "result", "name": "search"}])
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "caf\u00e9?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": {"query": "x"}}}]},
        {"role": "tool", "content": "result", "tool_call_id": "call_1"}]


def test_the_system_and_developer_messages_a_conversation_starts_with_are_one_system_prompt():
    """Qwen's template takes one system message, first: a client's [system, developer, user] (or
    several of either) is joined into it, as Responses joins its instructions, for every API."""
    messages = prepare_messages([{"role": "system", "content": "You are terse."},
                                 {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                                 {"role": "system", "content": ""},
                                 {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Salut"},
                                 {"role": "user", "content": "Bye"}])
    assert messages == [{"role": "system", "content": "You are terse.\n\nAnswer in French."},
                        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Salut"},
                        {"role": "user", "content": "Bye"}]
    assert prepare_messages(messages) == messages  # (prepared again, as the session does: the same)
    later = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Late."}]
    assert prepare_messages(later) == later  # a system message later on is the template's to refuse


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    (["hello"], "must be an object"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "ChatSession.add_image"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}], "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "a JSON object"),
    ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], "must be"),
    ([{"role": "system", "content": "x"}, {"role": "developer", "content": [{"type": "image", "image": "0" * 64}]}],
     r"messages\[1\]: a system or developer message holds text only"),
])
def test_bad_messages_are_refused_with_a_reason(messages, problem):
    with pytest.raises(ChatError, match=problem):
        prepare_messages(messages)


@pytest.mark.parametrize("tools, problem", [
    ({"type": "function"}, "must be a list"),
    ([{"type": "code_interpreter"}], "of type \"function\""),
    ([{"type": "function"}], "function must be an object"),
    ([{"type": "function", "function": {"name": "bad name"}}], "without spaces"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON schema object"),
])
def test_bad_tools_are_refused_with_a_reason(tools, problem):
    with pytest.raises(ChatError, match=problem):
        check_tools(tools)
    assert check_tools(TOOLS) is TOOLS


# --- streamed calls: their arguments as JSON text, piece by piece --------------------------------


def _streamed(text: str, size: int, tools=TOOLS):
    """The reader's events for `text` fed `size` characters at a time: (content, calls, per call
    the events of its start and its argument pieces)."""
    reader = ToolCallReader(tools)
    events = []
    for i in range(0, len(text), size):
        events += reader.feed(text[i:i + size])
    events += reader.finish()
    streamed = []
    for kind, value in events:
        if kind == "call_start":
            streamed.append({"start": value, "arguments": []})
        elif kind == "arguments":
            streamed[-1]["arguments"].append(value)
    content = "".join(v for k, v in events if k == "content")
    return content, reader.calls, streamed, events


def test_streamed_arguments_join_to_the_final_json_for_every_split():
    code = "if a < b:\n    print('<b>')\n</p>\n\n"
    text = ("Let me look.\n\n" + call("search", query='say "hi" </p>\nand \\ <tab>', limit="7", exact="true",
                                      code=code, filters='{"lang": "en", "n": [1, 2.5]}', note="null")
            + "\n" + call("search", query="second") + "\n" + call("ping_all"))
    whole = split_tool_calls(text, TOOLS)
    for size in (1, 2, 3, 5, 8, 13, len(text)):
        content, calls, streamed, events = _streamed(text, size)
        assert (content, functions(calls)) == (whole[0], functions(whole[1]))
        assert [s["start"]["function"]["name"] for s in streamed] == ["search", "search", "ping_all"]
        for s, c in zip(streamed, calls):
            joined = "".join(s["arguments"])
            assert joined == json.dumps(c["function"]["arguments"], ensure_ascii=False)
            assert json.loads(joined) == c["function"]["arguments"]
            assert s["start"]["id"] == c["id"] and s["start"]["type"] == "function"
        # Each call is announced before its arguments, and its arguments end before the next call starts.
        kinds = [k for k, _ in events if k != "content"]
        assert kinds[0] == "call_start" and kinds.count("call_start") == kinds.count("call") == 3
    assert functions(whole[1])[0]["arguments"] == {"query": 'say "hi" </p>\nand \\ <tab>', "limit": 7,
                                                   "exact": True, "code": code,
                                                   "filters": {"lang": "en", "n": [1, 2.5]}, "note": None}


def test_string_values_stream_as_they_are_written_other_values_at_their_close():
    reader = ToolCallReader(TOOLS)
    assert reader.feed("<tool_call>\n<function=search>\n") == []  # not yet sure it is a call
    events = reader.feed("<parameter=query>\nhello <")
    assert [k for k, _ in events] == ["call_start", "arguments"]
    assert events[1][1] == '{"query": "hello '  # `<` may start a closing tag: held
    assert reader.feed("b> world\n") == [("arguments", "<b> world")]  # the newline may be layout: held
    assert reader.feed("</parameter>\n<parameter=limit>\n4") == [("arguments", '"')]
    assert reader.feed("2\n") == []
    assert reader.feed("</parameter>\n") == [("arguments", ', "limit": 42')]
    events = reader.feed("</function>\n</tool_call>")
    assert events[0] == ("arguments", "}") and events[1][0] == "call"
    assert events[1][1]["function"]["arguments"] == {"query": "hello <b> world", "limit": 42}


def test_a_streamed_call_cut_off_still_joins_to_its_arguments():
    text = "<tool_call>\n<function=search>\n<parameter=limit>\n3\n</parameter>\n<parameter=code>\nx = 1 <"
    for size in (1, 4, len(text)):
        content, calls, streamed, _ = _streamed(text, size)
        assert content == "" and functions(calls) == [{"name": "search", "arguments": {"limit": 3, "code": "x = 1 "}}]
        reader = ToolCallReader(TOOLS)
        reader.feed(text)
        reader.finish()
        assert reader.cut_off
        reader = ToolCallReader(TOOLS)
        reader.feed(call("search", query="a")[:-len("</tool_call>")])  # cut off after </function>: complete
        reader.finish()
        assert not reader.cut_off and len(reader.calls) == 1
        assert json.loads("".join(streamed[0]["arguments"])) == calls[0]["function"]["arguments"]


def test_a_parameter_given_twice_keeps_its_first_value():
    text = call("search", query="a") [:-len("</function>\n</tool_call>")] + \
        "<parameter=query>\nb\n</parameter>\n</function>\n</tool_call>"
    content, calls, streamed, _ = _streamed(text, 3)
    assert functions(calls) == [{"name": "search", "arguments": {"query": "a"}}]
    assert "".join(streamed[0]["arguments"]) == '{"query": "a"}'
