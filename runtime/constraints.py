"""What the model may write, enforced by llama.cpp's samplers: JSON output (`response_format`), a
tool call it must make (`tool_choice` "required" or a named function), a tool call it must not.

A grammar applies to the answer, not the reasoning: when the reply starts in a `<think>` block (thinking
on) the grammar is lazy and wakes up on the `</think>` token (whose text it then reads first); with
thinking off the generation prompt has closed the block already and the grammar holds from the first
token. The answer never escapes it: the reply's answer starts only where the grammar does. A tool call
that must be made may also start at a `<tool_call>` token in the reasoning (a model that forgot
`</think>`, which ReplySplitter reads as the end of the reasoning): that token wakes the grammar too.
For JSON output it does not (it stays reasoning text; the answer starts at `</think>`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import llama_cpp as L

from .errors import ChatError
from .native import Model

CALL_TOKEN = "<tool_call>"

# Any JSON value (llama.cpp's grammars/json.gbnf, in GBNF's own notation).
_JSON_VALUE = r'''
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt/] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''


@dataclass(frozen=True)
class Constraint:
    grammar: str | None = None  # GBNF with a `root` rule
    forbid_tool_calls: bool = False
    tool_call: bool = False  # the grammar is that of a tool call (it starts with `<tool_call>`)


def json_constraint(schema: dict | None) -> Constraint:
    """JSON output: any object, or one that matches a JSON schema."""
    if schema is None:
        return Constraint('root ::= object\n' + _JSON_VALUE)
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # the converter llama-cpp-python ships

    try:
        return Constraint(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as e:  # noqa: BLE001 - the converter raises whatever it meets
        raise ChatError(f"response_format.json_schema.schema cannot be enforced: {e}") from None


def tool_call_constraint(tools: list[dict], name: str | None, parallel: bool) -> Constraint:
    """The answer is one tool call (or several, with `parallel`), of `name` or of any tool, in the
    template's format, with only the tool's own parameter names."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ChatError(f"tool_choice names a function ({name}) that is not among the tools" if name
                        else "tool_choice asks for a tool call but no tools were given")
    more = ' ("\\n" call)*' if parallel else ""
    rules = [f"root ::= call{more}",
             "call ::= " + " | ".join(f"call{i}" for i in range(len(chosen))),
             'value ::= ([^<] | "<" [^/])*']
    for i, function in enumerate(chosen):
        keys = list(((function.get("parameters") or {}).get("properties") or {}))
        params = f' param{i}*' if keys else ""
        rules.append(f'call{i} ::= "<tool_call>\\n<function=" {_literal(function["name"])} ">\\n"{params} '
                     f'"</function>\\n</tool_call>"')
        if keys:
            alternatives = " | ".join(_literal(k) for k in keys)
            rules.append(f'param{i} ::= "<parameter=" ({alternatives}) ">\\n" value "\\n</parameter>\\n"')
    return Constraint("\n".join(rules) + "\n", tool_call=True)


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal uses JSON's escapes


def samplers(model: Model, constraint: Constraint | None, *, in_reasoning: bool) -> list:
    """Native samplers for `Sampler(..., constraints=...)`, checked: llama.cpp returns NULL for a
    grammar it cannot parse."""
    if constraint is None:
        return []
    out = []
    if constraint.forbid_tool_calls:
        token = model.single_token(CALL_TOKEN)
        if token is not None:
            bias = (L.llama_logit_bias * 1)()
            bias[0].token, bias[0].bias = token, float("-inf")
            out.append(L.llama_sampler_init_logit_bias(model.n_vocab, 1, bias))
    if constraint.grammar:
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
            for s in out:
                L.llama_sampler_free(s)
            raise ChatError("the output constraint could not be turned into a llama.cpp grammar")
        out.append(sampler)
    return out


__all__ = ["Constraint", "json_constraint", "samplers", "tool_call_constraint"]
