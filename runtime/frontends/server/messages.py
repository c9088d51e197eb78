"""POST /v1/messages: Anthropic's Messages API, translated onto ChatSession.respond.

What Claude Code and the Anthropic SDK speak. The system prompt and the content blocks (text,
base64 images, tool_use, tool_result, thinking) become OpenAI-style chat messages, the same ones
Chat Completions gives the session, so a conversation reaches the same checkpoints whichever API
carries it; the reply comes back as thinking, text and tool_use blocks, streamed as Anthropic's
events. Each request re-sends its whole conversation, as in Chat Completions; the state cache
evaluates only what no earlier prompt evaluated. Errors are Anthropic-shaped:
{"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import uuid

from ...conversation.tools import check_tools, prepare_messages
from ...engine.errors import ChatError
from . import fields
from .fields import AUTO, NONE, REQUIRED
from .http import BadRequest, Job, event_stream, images_of, job_events, read_json, whole_reply, sse

# Fields read and deliberately ignored (documented in docs/serve.md).
IGNORED_FIELDS = ("model", "metadata", "service_tier", "cache_control", "container", "inference_geo", "speed",
                  "thinking.budget_tokens", "output_config.effort")

# Anthropic's error type for each status.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error"}


def error(e: BadRequest):
    from starlette.responses import JSONResponse

    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(error_body(e), status_code=e.status, headers=headers)


def error_body(e: BadRequest) -> dict:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(e.status, "api_error"), "message": str(e)}}


class Messages:
    """The routes and their handlers, over a Server (its worker, its key, its model's name)."""

    def __init__(self, server) -> None:
        self.server = server

    def routes(self) -> list:
        from starlette.routing import Route

        return [Route("/v1/messages", self._create, methods=["POST"]),
                Route("/v1/messages/count_tokens", self._count_tokens, methods=["POST"])]

    async def _create(self, request):
        try:
            self.server.authorize(request)
            body = await read_json(request)
            kwargs, prompt_tokens = self._parse(body)
            stream = bool(body.get("stream"))
            job = self.server.submit(kwargs, stream=stream)
        except BadRequest as e:
            return error(e)
        message_id = "msg_" + uuid.uuid4().hex[:24]
        if stream:
            return event_stream(self._stream(job, _Blocks(message_id, self.server.model_name, prompt_tokens)))
        return await whole_reply(self.server, request, job, lambda reply: {
            **_message(message_id, self.server.model_name, content_blocks(reply)), **_ending(reply),
            "usage": usage(reply)}, error)

    async def _stream(self, job: Job, blocks: "_Blocks"):
        try:
            yield blocks.start()
            async for kind, value in job_events(self.server, job):
                if kind == "idle":
                    yield sse({"type": "ping"}, "ping")  # (a closed connection shows when written to)
                elif kind == "piece":
                    for event in blocks.piece(value):
                        yield event
                elif kind == "error":
                    yield sse(error_body(value), "error")
                else:
                    for event in blocks.close():
                        yield event
                    yield sse({"type": "message_delta", "delta": _ending(value), "usage": usage(value)},
                              "message_delta")
                    yield sse({"type": "message_stop"}, "message_stop")
        finally:
            self.server.cancel(job)

    async def _count_tokens(self, request):
        from starlette.responses import JSONResponse

        try:
            self.server.authorize(request)
            body = await read_json(request)
            _, prompt_tokens = self._parse({"max_tokens": 1, **body} if isinstance(body, dict) else body)
        except BadRequest as e:
            return error(e)
        return JSONResponse({"input_tokens": prompt_tokens})

    # --- the request ----------------------------------------------------------------------------

    def _parse(self, body) -> tuple[dict, int]:
        """The session's arguments and the prompt's length in tokens, or BadRequest."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise BadRequest("max_tokens: Field required", param="max_tokens")
        fields.positive_int(body, "max_tokens")
        messages, images = images_of(chat_messages(body.get("system"), body.get("messages")))
        try:
            messages = prepare_messages(messages)
            tools = check_tools(function_tools(body.get("tools")))
        except ChatError as e:
            raise BadRequest(str(e), param="tools" if str(e).startswith("tools") else "messages") from None
        think = _think(body.get("thinking"))
        kwargs = {"messages": messages, "images": images, "tools": tools, "think": think, "max_tokens": max_tokens,
                  **fields.sampling(body, ("temperature", "top_p", "top_k"))}
        stop = fields.stop_strings(body.get("stop_sequences"), "stop_sequences", None)
        if stop:
            kwargs["stop"] = stop
        kwargs.update(self._constraint(body, tools))
        return kwargs, fields.check_conversation(self.server.session, messages, tools, think, "messages")

    @staticmethod
    def _constraint(body: dict, tools: list[dict]):
        choice = body.get("tool_choice") or {"type": "auto"}
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none") or (kind == "tool" and not isinstance(choice.get("name"), str)):
            raise BadRequest('tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or '
                             '{"type": "tool", "name": ...}', param="tool_choice")
        parallel = not choice.get("disable_parallel_tool_use", False)
        choice = {"auto": AUTO, "any": REQUIRED, "none": NONE}.get(kind) or choice["name"]
        config = body.get("output_config") or {}
        fmt = config.get("format") if isinstance(config, dict) else None
        json_output = False
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
                raise BadRequest('output_config.format must be {"type": "json_schema", "schema": {...}}',
                                 param="output_config")
            json_output = fmt["schema"] if choice == AUTO else False
        return fields.output_constraint(tools, choice, parallel, json_output, choice_param="tool_choice",
                                        format_param="output_config")


def _think(thinking) -> bool | None:
    """enabled: thinking on; disabled: off; absent or adaptive: the template's default (as for the
    other APIs: Qwen3.5 thinks)."""
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise BadRequest('thinking must be {"type": "enabled"}, {"type": "disabled"} or {"type": "adaptive"}',
                         param="thinking")
    return {"enabled": True, "disabled": False}.get(kind)


# --- the request's blocks → chat messages --------------------------------------------------------


def chat_messages(system, messages) -> list[dict]:
    """The system prompt and messages as OpenAI chat messages: tool_result blocks become tool
    messages (in their place in the user turn), tool_use blocks the assistant's tool_calls,
    thinking blocks its reasoning_content, base64 images image_url parts with a data: URL."""
    out = []
    if system is not None:
        if isinstance(system, list):
            system = "".join(_text(block, f"system[{i}]") for i, block in enumerate(system))
        if not isinstance(system, str):
            raise BadRequest("system must be a string or a list of text blocks", param="system")
        if system:
            out.append({"role": "system", "content": system})
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f"{where}.role must be user or assistant", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif not isinstance(content, list):
            raise BadRequest(f"{where}.content must be a string or a list of content blocks", param="messages")
        elif role == "assistant":
            out.append(_assistant(content, where))
        else:
            out += _user(content, where)
    return out


def _assistant(blocks: list, where: str) -> dict:
    text, reasoning, calls = [], [], []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(_text(block, f"{where}.content[{j}]"))
        elif kind == "thinking":
            reasoning.append(block.get("thinking") or "")
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise BadRequest(f"{where}.content[{j}]: a tool_use block needs an id and a name", param="messages")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": block.get("input") or {}}})
        else:
            raise BadRequest(f"{where}.content[{j}]: an assistant's {kind!r} block is not supported "
                             "(text, thinking and tool_use are)", param="messages")
    message = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list, where: str) -> list[dict]:
    out, parts = [], []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content[{j}]"
        if kind == "tool_result":
            if parts:
                out.append({"role": "user", "content": parts})
                parts = []
            content = block.get("content")
            if isinstance(content, list):
                content = [_part(b, f"{at}.content[{k}]") for k, b in enumerate(content)]
            elif content is not None and not isinstance(content, str):
                raise BadRequest(f"{at}.content must be a string or a list of text and image blocks", param="messages")
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": content or ""})
        else:
            parts.append(_part(block, at))
    if parts:
        out.append({"role": "user", "content": parts})
    return out


def _part(block, where: str) -> dict:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return {"type": "text", "text": _text(block, where)}
    if kind == "image":
        source = block.get("source") or {}
        if source.get("type") != "base64" or not isinstance(source.get("data"), str):
            raise BadRequest(f"{where}: send the image as base64 (source.type \"base64\"); this server fetches "
                             "nothing from the network", param="messages")
        url = f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
        return {"type": "image_url", "image_url": {"url": url}}
    raise BadRequest(f"{where}: {kind!r} blocks are not supported (text, image, tool_use, tool_result and "
                     "thinking are)", param="messages")


def _text(block, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise BadRequest(f"{where} must be a text block", param="messages")
    return block["text"]


def function_tools(tools):
    """Anthropic's client tools ({"name", "description", "input_schema"}) as chat tools; server
    tools (web search, code execution, …) are refused: nothing here runs them."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise BadRequest(f"tools[{i}]: only client tools (with an input_schema) are supported, not {kind!r}",
                             param="tools")
        function = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {}}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


# --- the reply → content blocks ------------------------------------------------------------------


def content_blocks(reply) -> list[dict]:
    blocks = []
    if reply.reasoning:
        blocks.append({"type": "thinking", "thinking": reply.reasoning, "signature": ""})
    if reply.content:
        blocks.append({"type": "text", "text": reply.content})
    for call in reply.tool_calls:
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                       "input": call["function"]["arguments"]})
    return blocks


def _message(message_id: str, model: str, content: list[dict]) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content}


def _ending(reply) -> dict:
    if reply.stop_sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": reply.stop_sequence}
    if reply.tool_calls and not reply.call_cut_off:
        reason = "tool_use"
    elif reply.finish_reason in ("length", "context", "loop"):
        reason = "max_tokens"
    else:
        reason = "end_turn"
    return {"stop_reason": reason, "stop_sequence": None}


def usage(reply) -> dict:
    """Anthropic counts the prompt tokens read from its cache apart from input_tokens."""
    stats = reply.stats
    return {"input_tokens": stats.get("prompt_tokens", 0), "output_tokens": stats.get("gen_tokens", 0),
            "cache_read_input_tokens": stats.get("cached_tokens", 0), "cache_creation_input_tokens": 0}


class _Blocks:
    """A streamed reply as Anthropic's events: each run of thinking, of text, and each tool call is
    a content block, started, filled by deltas and stopped, in the order written."""

    def __init__(self, message_id: str, model: str, prompt_tokens: int) -> None:
        self.message_id, self.model, self.prompt_tokens = message_id, model, prompt_tokens
        self.index = -1
        self._open: str | None = None  # the open block's type
        self._blank = ""  # whitespace not yet shown (a text block starts at its first visible text)

    def start(self) -> str:
        # The prompt's split into evaluated and cached tokens is known once it is evaluated: the
        # message_delta at the end carries it.
        message = {**_message(self.message_id, self.model, []), "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0, "cache_read_input_tokens": 0,
                             "cache_creation_input_tokens": 0}}
        return sse({"type": "message_start", "message": message}, "message_start")

    def piece(self, piece) -> list[str]:
        if piece.kind == "reasoning":
            return self._delta("thinking", {"type": "thinking_delta", "thinking": piece.text})
        if piece.kind == "content":
            if self._open != "text" and not (self._blank + piece.text).strip():
                self._blank += piece.text
                return []
            text, self._blank = self._blank + piece.text, ""
            return self._delta("text", {"type": "text_delta", "text": text})
        if piece.kind == "tool_call_start":
            call = piece.call
            return self._begin("tool_use", {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                                            "input": {}})
        if piece.kind == "tool_call_arguments" and self._open == "tool_use":
            return [self._event({"type": "input_json_delta", "partial_json": piece.text})]
        if piece.kind == "tool_call":
            return self.close()
        return []  # notices are for people at a terminal

    def _delta(self, kind: str, delta: dict) -> list[str]:
        events = [] if self._open == kind else self._begin(kind, {"type": "thinking", "thinking": "", "signature": ""}
                                                           if kind == "thinking" else {"type": "text", "text": ""})
        return events + [self._event(delta)]

    def _begin(self, kind: str, block: dict) -> list[str]:
        events = self.close()
        self.index += 1
        self._open = kind
        return events + [sse({"type": "content_block_start", "index": self.index, "content_block": block},
                             "content_block_start")]

    def _event(self, delta: dict) -> str:
        return sse({"type": "content_block_delta", "index": self.index, "delta": delta}, "content_block_delta")

    def close(self) -> list[str]:
        if self._open is None:
            return []
        self._open, self._blank = None, ""
        return [sse({"type": "content_block_stop", "index": self.index}, "content_block_stop")]
