"""Tools: checking OpenAI function schemas and chat messages, and reading Qwen3.5's XML tool calls.

The template writes a call as

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

after the answer's text (and `\\n\\n`), with later calls on a new line. VALUE is a string as is
(unescaped, may span lines and hold `<`), anything else as JSON. Reading is exact for what the
template writes and forgiving of what a model writes: text before a call, several calls, a
missing `</tool_call>` or `</parameter>`, a stray closing tag. It never raises: what is not a
well-formed call (e.g. one cut off by the token limit) stays content, as text.
"""

from __future__ import annotations

import json
import secrets
import unicodedata

from .errors import ChatError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION, _FUNCTION_CLOSE = "<function=", "</function>"
_PARAMETER, _PARAMETER_CLOSE = "<parameter=", "</parameter>"
ROLES = ("system", "user", "assistant", "tool")


def nfc(text: str) -> str:
    """Qwen3.5's tokenizer normalizes to NFC before splitting; llama.cpp does not, so we do it."""
    return unicodedata.normalize("NFC", text)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# --- what a client sends --------------------------------------------------------------------------


def check_tools(tools) -> list[dict]:
    """OpenAI function tools ([{"type": "function", "function": {"name", "description",
    "parameters"}}]), checked; the template prints each one as JSON, as given."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ChatError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ChatError(f"{where} must be an object of type \"function\"")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ChatError(f"{where}.function must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in "<>\n ="):
            raise ChatError(f"{where}.function.name must be a non-empty name without spaces, '<', '>' or '='")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict) or not isinstance(parameters.get("properties", {}), dict):
            raise ChatError(f"{where}.function.parameters must be a JSON schema object")
    return tools


def prepare_messages(messages) -> list[dict]:
    """Chat messages as the template reads them, in new dicts: content as text (parts joined),
    NFC-normalized; tool-call arguments as mappings (clients send them as JSON strings, and the
    template iterates them); `developer` read as `system`; fields the template ignores left out."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list")
    prepared = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ChatError(f"{where} must be an object with a role")
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise ChatError(f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})")
        out = {"role": role, "content": _content(message.get("content"), f"{where}.content")}
        if role == "assistant":
            reasoning = message.get("reasoning_content", message.get("reasoning"))
            if isinstance(reasoning, str) and reasoning:
                out["reasoning_content"] = nfc(reasoning)
            calls = message.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise ChatError(f"{where}.tool_calls must be a list")
                out["tool_calls"] = [_prepare_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        elif role == "tool" and message.get("tool_call_id") is not None:
            out["tool_call_id"] = str(message["tool_call_id"])
        prepared.append(out)
    return prepared


def _content(content, where: str) -> str | list[dict]:
    """Text; or, when the message holds images, its parts in order: {"type": "text", "text"} and
    {"type": "image", "image": <SHA-256 of the image file>} (a ChatSession's image; "path" kept
    when it came from a file), which the template renders as <|vision_start|><|image_pad|><|vision_end|>,
    and a ChatSession's video ({"type": "video", "frames": [SHA-256, …], "seconds": […]}, add_video)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return nfc(content)
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": nfc(part["text"])})
            elif isinstance(part, dict) and part.get("type") == "image" and isinstance(part.get("image"), str):
                parts.append({k: part[k] for k in ("type", "image", "path") if k in part})
            elif isinstance(part, dict) and part.get("type") == "video" and isinstance(part.get("frames"), list) \
                    and isinstance(part.get("seconds"), list):
                parts.append({k: part[k] for k in ("type", "video", "frames", "seconds", "paths") if k in part})
            elif isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                raise ChatError(f"{where}: an image here must be {{\"type\": \"image\", \"image\": <its SHA-256>}} "
                                "as ChatSession.add_image returns it (qwen35 serve reads image_url parts)")
            else:
                raise ChatError(f"{where} must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts")
        if all(p["type"] == "text" for p in parts):
            return nfc("".join(p["text"] for p in parts))
        return parts
    raise ChatError(f"{where} must be a string, a list of text parts, or null")


def _prepare_call(call, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ChatError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ChatError(f"{where}.function.arguments is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise ChatError(f"{where}.function.arguments must be a JSON object")
    return {"id": str(call.get("id") or new_call_id()), "type": "function",
            "function": {"name": nfc(function["name"]), "arguments": arguments}}


# --- what the model writes ------------------------------------------------------------------------


def coerce(raw: str, schema: dict | None):
    """A parameter's value as its JSON schema says: strings as written; numbers, booleans, null,
    objects and arrays decoded from JSON; undecodable text stays a string. Without a schema,
    whatever decodes as JSON is decoded."""
    types = _schema_types(schema)
    if types and all(t == "string" for t in types if t != "null"):
        return None if "null" in types and raw.strip() == "null" else raw
    text = raw.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "boolean" in types and text in ("True", "False"):  # how the template prints Python's booleans
        return text == "True"
    return raw


def _schema_types(schema) -> list[str]:
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [t for t in kind if isinstance(t, str)]
    types = []
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or []:
            types += _schema_types(option)
    if "enum" in schema and not types:
        types = ["string"] if all(isinstance(v, str) for v in schema["enum"]) else []
    return types


def parse_call(body: str, tools: list[dict] | None = None) -> dict | None:
    """One call from the text between `<tool_call>` and `</tool_call>`, or None if it is not a
    well-formed call. Values are coerced by the named tool's parameter schema."""
    start = body.lstrip()
    if not start.startswith(_FUNCTION):
        return None
    end_name = start.find(">")
    name = start[len(_FUNCTION):end_name].strip() if end_name > 0 else ""
    if not name or "\n" in name or "<" in name:
        return None
    rest = start[end_name + 1:]
    end = rest.rfind(_FUNCTION_CLOSE)
    if end < 0:
        return None  # cut off before the call was complete
    properties = _properties(tools, name)
    inner, arguments, pos = rest[:end], {}, 0
    while (p := inner.find(_PARAMETER, pos)) >= 0:
        q = inner.find(">", p)
        if q < 0 or "\n" in inner[p:q]:
            return None
        key = inner[p + len(_PARAMETER):q].strip()
        close = inner.find(_PARAMETER_CLOSE, q)
        following = inner.find(_PARAMETER, q)
        if close < 0 or 0 <= following < close:  # a missing </parameter>: the value ends at the next one
            value_end = following if following >= 0 else len(inner)
            pos = value_end
        else:
            value_end = close
            pos = close + len(_PARAMETER_CLOSE)
        raw = inner[q + 1:value_end]
        raw = raw[1:] if raw.startswith("\n") else raw
        raw = raw[:-1] if raw.endswith("\n") else raw
        if not key:
            return None
        arguments[key] = coerce(raw, properties.get(key))
    return {"name": name, "arguments": arguments}


def _properties(tools: list[dict] | None, name: str) -> dict:
    for tool in tools or []:
        function = tool.get("function", {})
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return properties if isinstance(properties, dict) else {}
    return {}


class ToolCallReader:
    """Splits a streamed answer into its text and its tool calls, as they arrive.

    `feed(text)` and `finish()` return events: ("content", text) or ("call", {"id", "type",
    "function": {"name", "arguments"}}). A call is given whole once it is complete; text is given at
    once, except what might start a call (a tail that could be the start of `<tool_call>`) and
    whitespace that might only be the layout before one. The text events joined are the answer
    exactly as `content` should read: stripped, calls left out.
    """

    def __init__(self, tools: list[dict] | None = None, *, enabled: bool = True) -> None:
        self._tools = tools
        self._enabled = enabled
        self._buffer = ""
        self._in_call = False
        self._started = False  # some content was given (leading whitespace is layout)
        self._held = ""  # whitespace not yet known to be content
        self.calls: list[dict] = []
        self.content: list[str] = []

    def feed(self, text: str) -> list[tuple[str, object]]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, object]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = []
        while self._buffer:
            if not self._in_call:
                i = self._buffer.find(CALL_OPEN) if self._enabled else -1
                if i < 0:
                    keep = 0 if final or not self._enabled else _partial_suffix(self._buffer, CALL_OPEN)
                    self._text(self._buffer[:len(self._buffer) - keep], events)
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                self._text(self._buffer[:i], events)
                self._buffer = self._buffer[i + len(CALL_OPEN):]
                self._in_call = True
                continue
            close = self._buffer.find(CALL_CLOSE)
            reopen = self._buffer.find(CALL_OPEN)
            if close >= 0 and (reopen < 0 or close < reopen):
                body, consumed = self._buffer[:close], close + len(CALL_CLOSE)
            elif reopen >= 0:
                body, consumed = self._buffer[:reopen], reopen  # a missing </tool_call>
            elif final:
                body, consumed = self._buffer, len(self._buffer)
            else:
                break
            raw = self._buffer[:consumed]
            self._buffer = self._buffer[consumed:]
            self._in_call = False
            call = parse_call(body, self._tools)
            if call is None:
                self._text(CALL_OPEN + raw, events)
            else:
                call = {"id": new_call_id(), "type": "function", "function": call}
                self.calls.append(call)
                self._held = ""  # the layout between the text and the call
                events.append(("call", call))
        if final and self._in_call:
            self._in_call = False  # (an empty call at the very end)
            self._text(CALL_OPEN, events)
        return events

    def _text(self, text: str, events: list) -> None:
        if not text:
            return
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        if body:
            self.content.append(body)
            events.append(("content", body))


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def split_tool_calls(content: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
    """(content without tool calls, calls) for a whole answer."""
    reader = ToolCallReader(tools)
    reader.feed(content)
    reader.finish()
    return "".join(reader.content), reader.calls
