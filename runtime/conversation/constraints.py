"""What the model may write: JSON output (`response_format`), a tool call it must make
(`tool_choice` "required" or a named function), a tool call it must not.

The grammars are llguidance's (a maintained Rust library, wheels for x86-64 and ARM Linux, macOS
and Windows): JSON schemas compile to its grammars directly, and the Qwen3.5 XML call is a Lark
grammar with the tool's own parameter names and typed values. The engine's sampler checks each
drawn token against it and asks for a token mask only when one is refused (engine/grammar.py:
exact, and free while the model keeps to the format). Where llguidance cannot be installed, the
same constraints become llama.cpp's GBNF grammar samplers, as before it (correct, ~2.5× slower:
they walk every candidate through the grammar at every token); the session says so once.

A grammar applies to the answer, not the reasoning: when the reply starts in a `<think>` block
(thinking on) the grammar sleeps and wakes up at the `</think>` token, after which newlines may
come before the answer; with thinking off the generation prompt has closed the block already and
the grammar holds from the first token. The answer never escapes it: the reply's answer starts
only where the grammar does. A tool call that must be made may also start at a `<tool_call>` token
in the reasoning (a model that forgot `</think>`, which ReplySplitter reads as the end of the
reasoning): that token wakes the grammar too, as the call's first token. For JSON output it does
not (it stays reasoning text; the answer starts at `</think>`).
"""

from __future__ import annotations

import ctypes
import json
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

import llama_cpp as L

from ..engine.errors import ChatError
from ..engine.native import Model

try:
    import llguidance
except ImportError:  # no wheel for this platform, and no Rust to build one
    llguidance = None

FAST = llguidance is not None
FALLBACK_NOTICE = ("structured output (JSON schemas, forced tool calls) uses llama.cpp's grammar sampler, "
                   "about 2.5x slower: llguidance is not installed (pip install llguidance)")

CALL_TOKEN = "<tool_call>"

# JSON whitespace where JSON allows it: none, a space, or a newline and an indent (as llama.cpp's
# grammars/json.gbnf has it). Bounded: a model cannot spend its tokens on blank lines.
_WHITESPACE = r"(?: |\n[ \t]{0,20})"
_JSON_OPTIONS = {"whitespace_pattern": _WHITESPACE}

# Any JSON value (llama.cpp's grammars/json.gbnf, in GBNF's own notation): the fallback's JSON.
_JSON_VALUE_GBNF = r'''
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt/] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''


@dataclass(frozen=True)
class Constraint:
    """`grammar`: the answer's grammar with a `root` rule — Lark for llguidance when `fast`, GBNF
    for llama.cpp's grammar sampler otherwise."""

    grammar: str | None = None
    forbid_tool_calls: bool = False
    tool_call: bool = False  # the grammar is that of a tool call (it starts with `<tool_call>`)
    fast: bool = FAST


# --- building the grammars --------------------------------------------------------------------


def json_constraint(schema: dict | None, *, fast: bool = FAST) -> Constraint:
    """JSON output: any object, or one that matches a JSON schema. A schema llguidance cannot
    enforce (a keyword it does not implement, an unknown string format) is refused here, naming
    the keyword: never an unconstrained reply."""
    if not fast:
        return Constraint(_json_gbnf(schema), fast=False)
    body = _json_rule({"type": "object"} if schema is None else schema)
    constraint = Constraint(f"root: {body}\n")
    problem = _lark_problem(constraint.grammar)
    if problem:
        raise ChatError(f"response_format.json_schema.schema cannot be enforced: {problem}")
    return constraint


def tool_call_constraint(tools: list[dict], name: str | None, parallel: bool, *, fast: bool = FAST) -> Constraint:
    """The answer is one tool call (or several, with `parallel`), of `name` or of any tool, in the
    template's format: the tool's own parameters in its schema's order, the required ones present,
    each value as the template writes it (a string as is, anything else as JSON of its schema)."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ChatError(f"tool_choice names a function ({name}) that is not among the tools" if name
                        else "tool_choice asks for a tool call but no tools were given")
    if not fast:
        return Constraint(_tool_call_gbnf(chosen, parallel), tool_call=True, fast=False)
    more = ' ("\\n" call)*' if parallel else ""
    rules = [f"root: call{more}", "call: " + " | ".join(f"call{i}" for i in range(len(chosen))),
             # A string value, as the template writes it: any text without `</`, then the closing tag.
             r'TEXT_VALUE: /([^<]|<[^\/])*\n<\/parameter>\n/']
    for i, function in enumerate(chosen):
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") or {}
        required = set(parameters.get("required") or [])
        items = []
        for j, (key, schema) in enumerate(properties.items()):
            rules.append(f'param{i}_{j}: "<parameter=" {_lark_string(key)} ">\\n" {_value_rule(schema, parameters)}')
            items.append(f"param{i}_{j}" + ("" if key in required else "?"))
        rules.append(f'call{i}: <tool_call> "\\n<function=" {_lark_string(function["name"])} ">\\n" '
                     f'{" ".join(items)} "</function>\\n" </tool_call>')
    constraint = Constraint("\n".join(rules) + "\n", tool_call=True)
    problem = _lark_problem(constraint.grammar)
    if problem:
        raise ChatError(f"the tools' parameter schemas cannot be enforced: {problem}")
    return constraint


def _json_rule(schema: dict) -> str:
    """`%json {...}` for a schema, with our whitespace (a schema's own `x-guidance` options win)
    and integers held to what JSON readers keep exactly."""
    if not isinstance(schema, dict):
        raise ChatError("a JSON schema must be an object")
    options = {**_JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**_exact_integers(schema), "x-guidance": options})


# I-JSON's interoperable integers (RFC 7493: ±(2^53 - 1), 16 digits at most). Without a bound a
# model that repeats a digit never closes the number; llama.cpp's json.gbnf bounds digits too.
_SAFE_INTEGER = 2**53 - 1
_DATA_KEYWORDS = ("enum", "const", "default", "examples", "x-guidance")


def _exact_integers(schema):
    """`schema` with every integer that has no bound given I-JSON's (values, not subschemas, are
    left alone)."""
    if isinstance(schema, list):
        return [_exact_integers(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else _exact_integers(v) for k, v in schema.items()}
    kinds = schema.get("type")
    if kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds):
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            out["minimum"] = -_SAFE_INTEGER
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            out["maximum"] = _SAFE_INTEGER
    return out


def _value_rule(schema, parameters: dict) -> str:
    """A parameter's value and its closing tag: text for a string (one of its `enum` if it has
    one), JSON of its schema for anything else (its `$defs` brought along for `$ref`)."""
    schema = schema if isinstance(schema, dict) else {}
    close = '"\\n</parameter>\\n"'
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    if kinds and all(k == "string" for k in kinds):
        if isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
            return "(" + " | ".join(_lark_string(v) for v in schema["enum"]) + f") {close}"
        return "TEXT_VALUE"
    if not kinds and not any(k in schema for k in ("enum", "const", "anyOf", "oneOf", "allOf", "$ref")):
        return "TEXT_VALUE"  # no type: the template writes what it is given, as text or JSON
    definitions = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters and k not in schema}
    return f"{_json_rule({**schema, **definitions})} {close}"


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal reads JSON's escapes


def _lark_problem(grammar: str) -> str | None:
    """Why llguidance refuses a grammar (the first line of its message), or None."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark("start: root\n" + grammar), None)
    if not failed:
        return None
    first = messages[0].strip().splitlines()[0]
    return re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", first)


def _json_gbnf(schema: dict | None) -> str:
    if schema is None:
        return 'root ::= object\n' + _JSON_VALUE_GBNF
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # the converter llama-cpp-python ships

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 - the converter raises whatever it meets
        raise ChatError(f"response_format.json_schema.schema cannot be enforced: {e}") from None


def _tool_call_gbnf(chosen: list[dict], parallel: bool) -> str:
    more = ' ("\\n" call)*' if parallel else ""
    rules = [f"root ::= call{more}",
             "call ::= " + " | ".join(f"call{i}" for i in range(len(chosen))),
             'value ::= ([^<] | "<" [^/])*']
    for i, function in enumerate(chosen):
        keys = list(((function.get("parameters") or {}).get("properties") or {}))
        params = f' param{i}*' if keys else ""
        rules.append(f'call{i} ::= "<tool_call>\\n<function=" {json.dumps(function["name"])} ">\\n"{params} '
                     f'"</function>\\n</tool_call>"')
        if keys:
            alternatives = " | ".join(json.dumps(k) for k in keys)
            rules.append(f'param{i} ::= "<parameter=" ({alternatives}) ">\\n" value "\\n</parameter>\\n"')
    return "\n".join(rules) + "\n"


# --- enforcing them -----------------------------------------------------------------------------


_tokenizers: "weakref.WeakKeyDictionary[Model, object]" = weakref.WeakKeyDictionary()
_builds: "weakref.WeakKeyDictionary[Model, VocabularyBuild]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def tokenizer(model: Model):
    """llguidance's view of the model's vocabulary (every token's bytes, special tokens marked),
    built once per model: ~1.5 s for Qwen3.5's 248k tokens on two cores (a server builds it while
    idle: VocabularyBuild)."""
    with _lock:
        made = _tokenizers.get(model)
    return made if made is not None else building(model).step()


def building(model: Model) -> "VocabularyBuild":
    """The build of `model`'s vocabulary view, started or under way (one per model)."""
    with _lock:
        build = _builds.get(model)
        if build is None:
            build = _builds[model] = VocabularyBuild(model)
        return build


class VocabularyBuild:
    """llguidance's view of a vocabulary, built in steps that a waiting request stops.

    A server once built it on a thread of its own at start, at the lowest priority; but the build is
    a Python loop over 248k tokens and then ~0.9 s in llguidance's Rust holding the GIL, so the
    first replies' decoding stalled behind it (up to 0.9 s between two tokens, for the first 5 s
    of a server at 2 threads) and `auto` timed its steps on a shared machine; stopped within that
    second, the session freed the model under it (SIGSEGV). Now the server's worker runs it while
    idle (ChatSession.idle), a chunk of tokens at a time, stopping when a request waits, and the last
    part (the Rust call) only when nothing waits: a request arriving just then waits for it, once. A
    constrained reply before the build is done finishes it (`tokenizer`)."""

    CHUNK = 8192  # tokens between two looks at `busy` (~20 ms)

    def __init__(self, model: Model) -> None:
        # (weakly: the registry's key is the model, which a value holding it would keep alive for
        # good when a session closes before its build ends)
        self._model = weakref.ref(model)
        self.pieces: list[bytes] = []
        self.eog: list[int] = []
        self._buf = ctypes.create_string_buffer(1024)
        self._stepping = threading.Lock()  # (one thread builds at a time)

    @property
    def done(self) -> bool:
        model = self._model()
        return model is not None and model in _tokenizers

    def step(self, busy: Callable[[], bool] = lambda: False):
        """Build on until done (returns the view) or until `busy()` says a request waits (None)."""
        with self._stepping:
            return self._step(busy)

    def _step(self, busy: Callable[[], bool]):
        model, buf = self._model(), self._buf
        if model is None:  # (its session closed)
            return None
        while len(self.pieces) < model.n_vocab:
            if busy():
                return None
            for token in range(len(self.pieces), min(len(self.pieces) + self.CHUNK, model.n_vocab)):
                n = L.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, True)
                piece = buf.raw[:max(n, 0)]
                attr = L.llama_vocab_get_attr(model.vocab, token)
                # llguidance's mark of a special token (never matched by text, named in grammars as
                # <tool_call>): llama.cpp's control tokens, and added ones written like a tag.
                if attr & L.LLAMA_TOKEN_ATTR_CONTROL or (attr & L.LLAMA_TOKEN_ATTR_USER_DEFINED
                                                         and piece.startswith(b"<") and piece.endswith(b">")):
                    piece = b"\xff" + piece
                if L.llama_vocab_is_eog(model.vocab, token):
                    self.eog.append(token)
                self.pieces.append(piece)
        if busy():
            return None
        with _lock:
            made = _tokenizers.get(model)
            if made is None:
                tokenize = ctypes.cast(L.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
                # (llguidance calls llama.cpp's tokenizer itself, for the text of grammars.)
                made = _tokenizers[model] = llguidance.LLTokenizer.from_llamacpp(
                    tokens=self.pieces, vocab_ptr=model.vocab, tokenize_fptr=tokenize, eos_token=self.eog,
                    slices=None)
                _builds.pop(model, None)
        return made


class GuidedGrammar:
    """An llguidance matcher as the engine's grammar.Grammar, asleep until a trigger token when the
    reply starts in the reasoning. `wakers`: trigger token → whether the grammar reads it as its
    own first token (`<tool_call>`) or it only opens the answer (`</think>`)."""

    def __init__(self, model: Model, grammar: str, wakers: dict[int, bool] | None) -> None:
        lexicon = tokenizer(model)
        self._matcher = llguidance.LLMatcher(lexicon, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        if self._matcher.is_error():
            raise ChatError(f"the output constraint is not a grammar llguidance can enforce: "
                            f"{self._matcher.get_error().strip().splitlines()[0]}")
        self._eos = frozenset(lexicon.eos_tokens)
        self._n_vocab = model.n_vocab
        self._bits = np.zeros((model.n_vocab + 31) // 32, np.int32)
        self._wakers = wakers
        self.asleep = wakers is not None

    def allows(self, token: int) -> bool:
        if self.asleep:
            return True
        if token in self._eos:  # the end of the reply: where the grammar may end
            return self._matcher.is_accepting()
        return self._matcher.validate_tokens([token]) == 1

    def allowed(self) -> np.ndarray:
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return np.unpackbits(self._bits.view(np.uint8), count=self._n_vocab, bitorder="little").view(bool)

    def accept(self, token: int) -> None:
        if self.asleep:
            if token not in self._wakers:
                return
            self.asleep = False
            if not self._wakers[token]:
                return
        if not self._matcher.consume_token(token):
            raise ChatError(f"the output grammar refused token {token}: {self._matcher.get_error()}")


def prepare(model: Model, constraint: Constraint | None, *, in_reasoning: bool):
    """(native samplers for `Sampler(constraints=...)`, a grammar for `Sampler(grammar=...)` or
    None) for a constraint, checked."""
    if constraint is None:
        return [], None
    natives = []
    if constraint.forbid_tool_calls:
        token = model.single_token(CALL_TOKEN)
        if token is not None:
            bias = (L.llama_logit_bias * 1)()
            bias[0].token, bias[0].bias = token, float("-inf")
            natives.append(L.llama_sampler_init_logit_bias(model.n_vocab, 1, bias))
    if not constraint.grammar:
        return natives, None
    if not constraint.fast:
        try:
            return natives + [_gbnf_sampler(model, constraint, in_reasoning)], None
        except ChatError:
            for sampler in natives:
                L.llama_sampler_free(sampler)
            raise
    close = model.single_token("</think>") if in_reasoning else None
    if close is None:
        return natives, GuidedGrammar(model, "start: root\n" + constraint.grammar, None)
    wakers = {close: False}
    call = model.single_token(CALL_TOKEN) if constraint.tool_call else None
    if call is not None:
        wakers[call] = True
    return natives, GuidedGrammar(model, "start: /\\n*/ root\n" + constraint.grammar, wakers)


def _gbnf_sampler(model: Model, constraint: Constraint, in_reasoning: bool):
    """llama.cpp's grammar sampler (the fallback), lazy while reasoning as GuidedGrammar is."""
    grammar = constraint.grammar.encode()
    close = model.single_token("</think>") if in_reasoning else None
    if close is not None:
        # The `</think>` token starts the grammar, and its text is the grammar's first; a call's
        # grammar may also start at its own first token (llama.cpp aborts on a trigger token
        # whose text the grammar refuses, so each trigger is one the grammar reads).
        triggers = [close]
        call = model.single_token(CALL_TOKEN) if constraint.tool_call else None
        if call is not None:
            triggers.append(call)
        head = rb'("</think>" [\\n]*)?' if call is not None else rb'"</think>" [\\n]*'
        grammar = re.sub(rb"(?m)^root\s*::=", rb'root ::= ' + head + rb' root0\nroot0 ::=', grammar, count=1)
        tokens = (L.llama_token * len(triggers))(*triggers)
        sampler = L.llama_sampler_init_grammar_lazy_patterns(model.vocab, grammar, b"root", None, 0, tokens,
                                                             len(triggers))
    else:
        sampler = L.llama_sampler_init_grammar(model.vocab, grammar, b"root")
    if not sampler:
        raise ChatError("the output constraint could not be turned into a llama.cpp grammar")
    return sampler


__all__ = ["FAST", "FALLBACK_NOTICE", "Constraint", "GuidedGrammar", "json_constraint", "prepare",
           "tokenizer", "tool_call_constraint"]
