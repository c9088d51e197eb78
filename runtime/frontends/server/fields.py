"""The request fields every API of the server reads alike, whatever it calls them.

Chat Completions, Responses and Messages name and nest the same settings differently (`max_tokens`,
`max_output_tokens`; `tool_choice: "required"`, `{"type": "any"}`; `response_format`,
`text.format`); each API module maps its own names onto these checks, so that a value means the
same thing — and a bad one is refused with the same words — whichever API carries it. The
conversation then goes to ChatSession.respond: one template, one tool reader, one set of grammars.
"""

from __future__ import annotations

from ...conversation.constraints import Constraint, json_constraint, tool_call_constraint
from ...engine.errors import ChatError
from .http import BadRequest

# The sampling settings: the request's name → (ChatSession's option, lowest, highest or None).
SAMPLING = {"temperature": ("temp", 0, 2), "top_p": ("top_p", 0, 1), "top_k": ("top_k", 0, None),
            "min_p": ("min_p", 0, 1), "presence_penalty": ("presence_penalty", -2, 2),
            "repeat_penalty": ("repeat_penalty", 0, None)}

# What an API's tool_choice comes to: any of the tools, none, or one named function.
AUTO, NONE, REQUIRED = "auto", "none", "required"


def sampling(body: dict, names=tuple(SAMPLING)) -> dict:
    """ChatSession's sampling options from the request's fields `names` (those it has)."""
    out = {}
    for name in names:
        option, low, high = SAMPLING[name]
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low \
                or (high is not None and value > high):
            raise BadRequest(f"{name} must be a number between {low} and {high if high is not None else 'any'}",
                             param=name)
        out[option] = int(value) if option == "top_k" else float(value)
    return out


def positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise BadRequest(f"{name} must be a positive integer", param=name)
    return value


def seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest("seed must be an integer", param="seed")
    return value & 0xFFFFFFFF


def parallel_tool_calls(body: dict) -> bool:
    """OpenAI's `parallel_tool_calls` (Chat Completions and Responses alike), default true."""
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    return parallel


def stop_strings(value, name: str, most: int | None) -> list[str] | None:
    if value is None:
        return None
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) \
            or (most is not None and len(value) > most):
        raise BadRequest(f"{name} must be a string or a list of {f'up to {most} ' if most else ''}strings", param=name)
    return value


def think_of_effort(effort, param: str) -> bool | None:
    """Thinking on or off from an OpenAI reasoning effort: "none" (and "minimal", which OpenAI
    documents as reasoning as little as possible) is off, a level is on; absent, the template's
    default."""
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
        raise BadRequest(f"{param} must be none, minimal, low, medium, high or xhigh", param=param)
    return effort not in ("none", "minimal")


def output_constraint(tools: list[dict], choice, parallel: bool, json_output=False, *,
                      choice_param: str, format_param: str) -> dict:
    """ChatSession.respond's arguments for what the answer may be: its `constraint`, whether to
    `read_tool_calls` out of it, and `parallel_tool_calls`. `choice`: AUTO, NONE, REQUIRED or a
    function's name; `parallel`: whether the answer may make several calls; `json_output`: False
    (free text), None (any JSON object) or a JSON schema. A call the client requires is enforced
    by a grammar of the template's call format (constraints.py); so is JSON output, which then
    leaves call-like text as content. One call at most (`parallel` false) is the session's to
    enforce, whatever the choice: the reply ends with its first complete call."""
    constraint, read_tool_calls = _constraint(tools, choice, parallel, json_output, choice_param, format_param)
    return {"constraint": constraint, "read_tool_calls": read_tool_calls, "parallel_tool_calls": parallel}


def _constraint(tools, choice, parallel, json_output, choice_param, format_param) -> tuple[Constraint | None, bool]:
    try:
        if choice == NONE:
            return Constraint(forbid_tool_calls=True), False
        if choice == REQUIRED:
            return tool_call_constraint(tools, None, parallel), True
        if choice != AUTO:
            return tool_call_constraint(tools, choice, False), True
    except ChatError as e:
        raise BadRequest(str(e), param=choice_param) from None
    if json_output is False:
        return None, True
    try:
        return json_constraint(json_output), False
    except ChatError as e:
        raise BadRequest(str(e), param=format_param) from None


def check_conversation(session, messages: list[dict], tools: list[dict], think: bool | None, param: str) -> int:
    """The prompt's length in tokens, or BadRequest now (not once it waited its turn) for a
    conversation the template refuses (no user message, say) or one that does not fit the context."""
    try:
        prompt = session.template.render(messages, add_generation_prompt=True, think=think, tools=tools)
    except ChatError as e:
        raise BadRequest(str(e), param=param) from None
    n = len(session.tokenize(prompt))
    if n >= session.n_ctx:
        raise BadRequest(f"the conversation does not fit the {session.n_ctx}-token context", param=param,
                         code="context_length_exceeded")
    return n
