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
missing `</tool_call>` or `</parameter>`, a stray closing tag, a call cut off by the token limit
(closed with what it holds). It never raises: what does not start as the template's format stays
content, as text. Calls are read as they stream (ToolCallReader), their arguments given as JSON text
piece by piece.
"""

from __future__ import annotations

import json
import secrets
import unicodedata

from ..engine.errors import ChatError

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
    template iterates them); `developer` read as `system`, and the system and developer messages
    the conversation starts with joined into one (join_system); fields the template ignores left out."""
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
    return join_system(prepared)


def join_system(messages: list[dict]) -> list[dict]:
    """Prepared messages with the system messages they start with (a client's system and developer
    messages, a Responses request's instructions) joined into one, blank-line separated: Qwen's
    template takes one system message, first, and refuses a second ("System message must be at
    the beginning"). A system message later in the conversation is left for the template to refuse."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    if lead < 2:
        return messages
    texts = [m["content"] for m in messages[:lead]]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ChatError(f"messages[{i}]: a system or developer message holds text only")
    return [{"role": "system", "content": "\n\n".join(t for t in texts if t)}] + messages[lead:]


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


def _is_text(schema) -> bool:
    """Whether a value of this schema is its text as written (so it can be streamed as it comes)."""
    types = _schema_types(schema)
    return bool(types) and all(t == "string" for t in types)


def _properties(tools: list[dict] | None, name: str) -> dict:
    for tool in tools or []:
        function = tool.get("function", {})
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return properties if isinstance(properties, dict) else {}
    return {}


_WAIT, _BAD = object(), object()  # what a piece of text may still become: anything / not that
_MARKERS = (_PARAMETER_CLOSE, _PARAMETER, _FUNCTION_CLOSE, CALL_CLOSE, CALL_OPEN)


def _header(text: str):
    """(key, length) of the `<parameter=KEY>` that `text` starts with; _WAIT if it may still
    become one, _BAD if it cannot."""
    gt, nl = text.find(">"), text.find("\n")
    if gt < 0:
        return _WAIT if nl < 0 else _BAD
    key = text[len(_PARAMETER):gt].strip()
    if 0 <= nl < gt or not key:
        return _BAD
    return key, gt + 1


def _value_end(text: str, final: bool) -> tuple[int, int | None, bool]:
    """Where a parameter's value (`text`: what follows its header) ends: (end, resume, complete),
    `resume` being where reading goes on (None: the end is not yet in `text`; then `end` is how
    much of it is surely value) and `complete` whether a tag closed it (not the end of the text).
    A value ends at `</parameter>`, at the next `<parameter=KEY>` (a missing `</parameter>`), at
    `</function>` when the call closes right after it, or at a call tag; any other `<` is the
    value's own text."""
    i = text.find("<")
    while i >= 0:
        rest = text[i:]
        if rest.startswith(_PARAMETER_CLOSE):
            return i, i + len(_PARAMETER_CLOSE), True
        if rest.startswith(CALL_CLOSE) or rest.startswith(CALL_OPEN):
            return i, i, True
        if rest.startswith(_PARAMETER):
            header = _header(rest)
            if header is _WAIT and not final:
                return i, None, False
            if header not in (_WAIT, _BAD):
                return i, i, True
        elif rest.startswith(_FUNCTION_CLOSE):
            after = rest[len(_FUNCTION_CLOSE):].lstrip()
            if after.startswith(CALL_CLOSE) or after.startswith(CALL_OPEN) or (final and not after):
                return i, i, True
            if not final and (CALL_CLOSE.startswith(after) or CALL_OPEN.startswith(after)):
                return i, None, False
        elif any(m.startswith(rest) for m in _MARKERS):  # the start of a tag, or of the value's text
            return (i, len(text), False) if final else (i, None, False)  # (cut off in a closing tag)
        i = text.find("<", i + 1)
    return len(text), (len(text) if final else None), False


class ToolCallReader:
    """Splits a streamed answer into its text and its tool calls, as they arrive.

    `feed(text)` and `finish()` return events:
      ("content", text)       the answer's text;
      ("call_start", call)    a call begins: {"id", "type", "function": {"name"}};
      ("arguments", text)     the next piece of that call's arguments as JSON text;
      ("call", call)          the call is complete: {"id", "type", "function": {"name", "arguments"}}.
    Text is given at once, except what might start a call (a tail that could be the start of
    `<tool_call>`) and whitespace that might only be the layout before one. The content events
    joined are the answer exactly as `content` should read: stripped, calls left out.

    A call is announced once it is sure to be one: its `<function=NAME>` and then a well-formed
    `<parameter=KEY>` or `</function>`; before that, something that is not the template's format
    stays content. From then on its arguments are given as the model writes them: a string value
    (by the tool's schema) as it comes, JSON-escaped; any other value once its `</parameter>` says
    what it is. The pieces joined are exactly `json.dumps(arguments, ensure_ascii=False)`. A call
    cut off (by the token limit) is closed with what it holds: a string value as far as it was
    written, another value only if complete. A parameter given twice keeps its first value.

    With `parallel=False` (a client's `parallel_tool_calls: false`) the answer ends with its first
    complete call: what follows is read no more, and `done` says the reply may stop there.
    """

    def __init__(self, tools: list[dict] | None = None, *, enabled: bool = True, parallel: bool = True) -> None:
        self._tools = tools
        self._enabled = enabled
        self._parallel = parallel
        self._buffer = ""
        self._state = self._read_text
        self._started = False  # some content was given (leading whitespace is layout)
        self._held = ""  # whitespace not yet known to be content
        self._call: dict | None = None  # the call being read
        self._properties: dict = {}
        self._value: dict | None = None  # the parameter being read: key, mode, raw parts, started
        self._n_arguments = 0  # arguments given in the JSON text so far
        self._closed = False  # the call's arguments are closed ("}" given)
        self.calls: list[dict] = []
        self.content: list[str] = []
        self.cut_off = False  # the text ended inside a call, before its `</function>`
        self.done = False  # (parallel=False) a call is complete: the answer ends there

    def feed(self, text: str) -> list[tuple[str, object]]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, object]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = []
        while self._state(events, final):
            pass
        return events

    # --- the states: each reads what it can and says whether reading goes on -------------------

    def _read_text(self, events: list, final: bool) -> bool:
        i = self._buffer.find(CALL_OPEN) if self._enabled else -1
        if i < 0:
            keep = 0 if final or not self._enabled else _partial_suffix(self._buffer, CALL_OPEN)
            self._text(self._buffer[:len(self._buffer) - keep], events)
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        self._text(self._buffer[:i], events)
        self._buffer = self._buffer[i + len(CALL_OPEN):]
        self._state = self._read_head
        return True

    def _read_head(self, events: list, final: bool) -> bool:
        """After `<tool_call>`: is this a call? (The buffer is kept whole until it is known.)"""
        text = self._buffer.lstrip()
        verdict = _WAIT
        if not text.startswith(_FUNCTION):
            verdict = _WAIT if _FUNCTION.startswith(text) else _BAD
        else:
            gt = text.find(">")
            name = text[len(_FUNCTION):gt if gt >= 0 else len(text)]
            if "\n" in name or "<" in name or (gt >= 0 and not name.strip()):
                verdict = _BAD
            elif gt >= 0:
                after = text[gt + 1:].lstrip()
                if after.startswith(_PARAMETER):
                    header = _header(after)
                    verdict = header if header in (_WAIT, _BAD) else name.strip()
                elif after.startswith(_FUNCTION_CLOSE):
                    verdict = name.strip()
                elif not (_PARAMETER.startswith(after) or _FUNCTION_CLOSE.startswith(after)):
                    verdict = _BAD
                if verdict is not _WAIT and verdict is not _BAD:
                    self._buffer = text[gt + 1:]
                    self._begin_call(verdict, events)
                    return True
        if verdict is _WAIT and not final:
            return False
        self._state = self._read_not_a_call
        return True

    def _read_not_a_call(self, events: list, final: bool) -> bool:
        """Call-like text that is not the template's format: content, up to its closing tag."""
        close, reopen = self._buffer.find(CALL_CLOSE), self._buffer.find(CALL_OPEN)
        if close >= 0 and (reopen < 0 or close < reopen):
            consumed = close + len(CALL_CLOSE)
        elif reopen >= 0:
            consumed = reopen  # a missing </tool_call>
        elif final:
            consumed = len(self._buffer)
        else:
            return False
        self._text(CALL_OPEN + self._buffer[:consumed], events)
        self._buffer = self._buffer[consumed:]
        self._state = self._read_text
        return True

    def _read_nothing(self, events: list, final: bool) -> bool:
        """After the one call the answer may make (parallel=False): the rest is not the answer."""
        self._buffer = ""
        return False

    def _read_parameters(self, events: list, final: bool) -> bool:
        """Inside a call, between its parameters (what is not a tag here is dropped)."""
        i = self._buffer.find("<")
        text = self._buffer = self._buffer[i:] if i >= 0 else ""
        if text.startswith(_PARAMETER):
            header = _header(text)
            if header is _BAD:
                self._buffer = text[len(_PARAMETER):]
                return True
            if header is not _WAIT:
                key, n = header
                self._buffer = text[n:]
                self._begin_value(key, events)
                return True
        elif text.startswith(_FUNCTION_CLOSE):
            self._buffer = text[len(_FUNCTION_CLOSE):]
            self._close_arguments(events)
            self._state = self._read_call_close
            return True
        elif text.startswith(CALL_CLOSE) or text.startswith(CALL_OPEN):
            self._buffer = text[len(CALL_CLOSE):] if text.startswith(CALL_CLOSE) else text
            self._end_call(events)
            return True
        elif text and not any(m.startswith(text) for m in _MARKERS):
            self._buffer = text[1:]
            return True
        if final:  # cut off
            self._buffer = ""
            self.cut_off = True
            self._end_call(events)
            return True
        return False

    def _read_value(self, events: list, final: bool) -> bool:
        value = self._value
        if not value["started"]:
            if not self._buffer and not final:
                return False
            if self._buffer.startswith("\n"):  # the template's layout
                self._buffer = self._buffer[1:]
            value["started"] = True
        end, resume, complete = _value_end(self._buffer, final)
        text = self._buffer[:end]
        # One newline before the closing tag is the template's layout; while the end is not yet
        # known, a newline at the end of what came is held back.
        text = text[:-1] if text.endswith("\n") else text
        self._add_to_value(text, events)
        if resume is None:
            self._buffer = self._buffer[len(text):]
            return False
        self._buffer = self._buffer[resume:]
        self._end_value(events, complete=complete)
        self.cut_off |= not complete
        self._state = self._read_parameters
        return True

    def _read_call_close(self, events: list, final: bool) -> bool:
        """After `</function>`: up to `</tool_call>` (or a next call, or the end)."""
        close, reopen = self._buffer.find(CALL_CLOSE), self._buffer.find(CALL_OPEN)
        if close >= 0 and (reopen < 0 or close < reopen):
            self._buffer = self._buffer[close + len(CALL_CLOSE):]
        elif reopen >= 0:
            self._buffer = self._buffer[reopen:]
        elif final:
            self._buffer = ""
        else:
            return False
        self._end_call(events)
        return True

    # --- building the call ------------------------------------------------------------------------

    def _begin_call(self, name: str, events: list) -> None:
        self._call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": {}}}
        self._properties = _properties(self._tools, name)
        self._n_arguments, self._closed = 0, False
        self._held = ""  # the layout between the text and the call
        events.append(("call_start", {"id": self._call["id"], "type": "function", "function": {"name": name}}))
        self._arguments("{", events)
        self._state = self._read_parameters

    def _begin_value(self, key: str, events: list) -> None:
        arguments = self._call["function"]["arguments"]
        mode = "skip" if key in arguments else "text" if _is_text(self._properties.get(key)) else "json"
        self._value = {"key": key, "mode": mode, "raw": [], "started": False}
        if mode == "text":
            arguments[key] = ""
            self._arguments(self._next_key(key) + '"', events)
        self._state = self._read_value

    def _add_to_value(self, text: str, events: list) -> None:
        if not text:
            return
        value = self._value
        value["raw"].append(text)
        if value["mode"] == "text":
            self._arguments(json.dumps(text, ensure_ascii=False)[1:-1], events)

    def _end_value(self, events: list, complete: bool) -> None:
        value, self._value = self._value, None
        arguments = self._call["function"]["arguments"]
        raw = "".join(value["raw"])
        if value["mode"] == "text":
            arguments[value["key"]] = raw
            self._arguments('"', events)
        elif value["mode"] == "json" and complete:
            coerced = coerce(raw, self._properties.get(value["key"]))
            arguments[value["key"]] = coerced
            self._arguments(self._next_key(value["key"]) + json.dumps(coerced, ensure_ascii=False), events)

    def _close_arguments(self, events: list) -> None:
        if self._value is not None:
            self._end_value(events, complete=False)
        if not self._closed:
            self._closed = True
            self._arguments("}", events)

    def _end_call(self, events: list) -> None:
        self._close_arguments(events)
        call, self._call = self._call, None
        self.calls.append(call)
        events.append(("call", call))
        self._state = self._read_text if self._parallel else self._read_nothing
        self.done = not self._parallel

    def _next_key(self, key: str) -> str:
        """The JSON text that introduces the next argument's value."""
        self._n_arguments += 1
        return (", " if self._n_arguments > 1 else "") + json.dumps(key, ensure_ascii=False) + ": "

    def _arguments(self, text: str, events: list) -> None:
        if events and events[-1][0] == "arguments":
            events[-1] = ("arguments", events[-1][1] + text)
        else:
            events.append(("arguments", text))

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
