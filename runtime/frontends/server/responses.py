"""POST /v1/responses: OpenAI's Responses API, with server-side state, translated onto ChatSession.respond.

The input (a string, or items: messages with text and image parts, function calls, their outputs,
reasoning) becomes OpenAI-style chat messages; the reply comes back as output items (`reasoning`,
`message`, `function_call`), streamed as the documented events. What the Responses API adds is state:
a response is stored (unless `store` is false) as the whole conversation it ended — the reply as
the template renders it, reasoning included — and `previous_response_id` continues from there, so
the client sends only the new input. The follow-up is rendered like any other request, and since
the state cache keys its checkpoints on tokens, the same rendering reaches the same checkpoints:
the stored conversation is not evaluated again, only the new input (and, where the template
renders the last reply otherwise than the model wrote it, that reply).

A stored response keeps its messages and images, not model state: the checkpoints stay in the state
cache, under its --cache-ram budget, and a stored response whose checkpoints were evicted is
still answered right (its conversation is evaluated again). The stored conversations take a
budget of their own, tied to that one (ResponseStore); an evicted or deleted response answers
404, as OpenAI's do — never another conversation.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass

from ...conversation.tools import check_tools, join_system, prepare_messages
from ...engine.errors import ChatError
from . import fields
from .fields import AUTO, NONE, REQUIRED
from .http import BadRequest, Job, error, event_stream, images_of, job_events, read_json, whole_reply, sse

# Fields read and deliberately ignored (documented in docs/serve.md).
IGNORED_FIELDS = ("model", "user", "metadata", "service_tier", "truncation", "include", "prompt_cache_key",
                  "prompt_cache_retention", "safety_identifier", "max_tool_calls", "top_logprobs", "stream_options",
                  "reasoning.summary", "text.verbosity")
# The stored conversations may take this share of the state cache's budget (--cache-ram).
STORE_SHARE = 8
MIN_STORE_BYTES = 16 << 20


@dataclass
class StoredResponse:
    id: str
    messages: list[dict]  # the conversation it ended, without the request's instructions, reply included
    images: dict[str, bytes]  # the images its messages show, by SHA-256
    response: dict  # the response object, as GET /v1/responses/{id} answers it
    nbytes: int  # its text (the images are counted once per store)


class ResponseStore:
    """The stored responses, least recently used first, within `max_bytes`.

    The budget is tied to the state cache's: an eighth of --cache-ram (at least 16 MiB). A stored
    conversation is small next to what makes it fast to continue — its checkpoints (a recurrent
    state alone is 19 MiB for the 0.8B model, 50 MiB for the 4B) — so the state cache forgets a
    conversation's state long before this store forgets its text, and a response continued after
    that is evaluated again, not refused; the bound matters for images (kept as files, each
    counted once however many responses show it) and for long-running servers. A count would
    bound nothing: one conversation may hold megabytes of images. Each response's text is counted
    whole although a chain shares its messages: the bound errs on the side of memory."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._image_refs: Counter[str] = Counter()
        self._image_bytes: dict[str, int] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._responses)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def put(self, stored: StoredResponse) -> None:
        self._responses[stored.id] = stored
        self.nbytes += stored.nbytes
        for image, data in stored.images.items():
            if not self._image_refs[image]:
                self._image_bytes[image] = len(data)
                self.nbytes += len(data)
            self._image_refs[image] += 1
        while self.nbytes > self.max_bytes and len(self._responses) > 1:
            self.delete(next(iter(self._responses)))

    def delete(self, response_id: str) -> bool:
        stored = self._responses.pop(response_id, None)
        if stored is None:
            return False
        self.nbytes -= stored.nbytes
        for image in stored.images:
            self._image_refs[image] -= 1
            if not self._image_refs[image]:
                del self._image_refs[image]
                self.nbytes -= self._image_bytes.pop(image)
        return True


class Responses:
    """The routes and their handlers, over a Server (its worker, its key, its model's name)."""

    def __init__(self, server) -> None:
        self.server = server
        self.store = ResponseStore(max(server.session.cache.max_bytes // STORE_SHARE, MIN_STORE_BYTES))

    def routes(self) -> list:
        from starlette.routing import Route

        return [Route("/v1/responses", self._create, methods=["POST"]),
                Route("/v1/responses/{response_id}", self._retrieve, methods=["GET"]),
                Route("/v1/responses/{response_id}", self._delete, methods=["DELETE"])]

    async def _create(self, request):
        try:
            self.server.authorize(request)
            body = await read_json(request)
            turn = self._parse(body)
            job = self.server.submit(turn.kwargs, stream=turn.stream)
        except BadRequest as e:
            return error(e)
        if turn.stream:
            return event_stream(self._stream(job, turn))
        return await whole_reply(self.server, request, job,
                                 lambda reply: turn.finish(reply, output_items(reply), self.store), error)

    async def _stream(self, job: Job, turn: "_Turn"):
        events = _Events(turn)
        try:
            yield events.emit("response.created", response=turn.response("in_progress"))
            yield events.emit("response.in_progress", response=turn.response("in_progress"))
            async for kind, value in job_events(self.server, job):
                if kind == "idle":
                    yield ": keepalive\n\n"  # writing to a closed connection tells us it is gone
                elif kind == "piece":
                    for event in events.piece(value):
                        yield event
                elif kind == "error":
                    for event in events.close():
                        yield event
                    yield events.emit("error", code=value.code or value.kind, message=str(value), param=value.param)
                    yield events.emit("response.failed", response=turn.response(
                        "failed", output=events.items, error={"code": "server_error", "message": str(value)}))
                else:
                    for event in events.close():
                        yield event
                    response = turn.finish(value, events.items, self.store)
                    yield events.emit("response.incomplete" if response["status"] == "incomplete"
                                      else "response.completed", response=response)
        finally:
            self.server.cancel(job)

    async def _retrieve(self, request):
        from starlette.responses import JSONResponse

        try:
            self.server.authorize(request)
            return JSONResponse(self._stored(request.path_params["response_id"]).response)
        except BadRequest as e:
            return error(e)

    async def _delete(self, request):
        from starlette.responses import JSONResponse

        try:
            self.server.authorize(request)
            response_id = request.path_params["response_id"]
            self._stored(response_id)
        except BadRequest as e:
            return error(e)
        self.store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    def _stored(self, response_id: str) -> StoredResponse:
        stored = self.store.get(response_id)
        if stored is None:
            raise BadRequest(f"Response with id '{response_id}' not found.", 404, param="response_id")
        return stored

    # --- the request ----------------------------------------------------------------------------

    def _parse(self, body) -> "_Turn":
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        for name, why in (("conversation", "use previous_response_id"), ("background", "responses run at once"),
                          ("prompt", "send the prompt's text as instructions")):
            if body.get(name):
                raise BadRequest(f"{name} is not supported ({why})", param=name)
        previous = body.get("previous_response_id")
        history, images = [], {}
        if previous is not None:
            if not isinstance(previous, str):
                raise BadRequest("previous_response_id must be a string", param="previous_response_id")
            stored = self.store.get(previous)
            if stored is None:
                raise BadRequest(f"Previous response with id '{previous}' not found.", 404,
                                 param="previous_response_id", code="previous_response_not_found")
            history, images = stored.messages, dict(stored.images)
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise BadRequest("instructions must be a string", param="instructions")

        new, new_images = images_of(input_messages(body.get("input")))
        images.update((hashlib.sha256(data).hexdigest(), data) for data in new_images)
        try:
            messages = prepare_messages(history + new)
            tools = check_tools(function_tools(body.get("tools")))
        except ChatError as e:
            raise BadRequest(str(e), param="tools" if str(e).startswith("tools") else "input") from None
        conversation = with_instructions(instructions, messages)

        store = body.get("store", True)
        if not isinstance(store, bool):
            raise BadRequest("store must be true or false", param="store")
        reasoning = body.get("reasoning") or {}
        if not isinstance(reasoning, dict):
            raise BadRequest("reasoning must be an object", param="reasoning")
        think = fields.think_of_effort(reasoning.get("effort"), "reasoning.effort")
        kwargs = {"messages": conversation, "images": list(images.values()), "tools": tools, "think": think,
                  "reasoning_comes_back": store,
                  **fields.sampling(body, ("temperature", "top_p"))}
        if fields.seed(body) is not None:  # (not OpenAI's: an extension, as in Chat Completions)
            kwargs["seed"] = fields.seed(body)
        if fields.positive_int(body, "max_output_tokens") is not None:
            kwargs["max_tokens"] = body["max_output_tokens"]
        kwargs.update(self._constraint(body, tools))
        fields.check_conversation(self.server.session, conversation, tools, think, "input")
        return _Turn(self.server.model_name, body, kwargs, messages, images, store)

    @staticmethod
    def _constraint(body: dict, tools: list[dict]):
        choice = body.get("tool_choice", AUTO)
        parallel = fields.parallel_tool_calls(body)
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise BadRequest('tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}',
                                 param="tool_choice")
            choice = choice["name"]
        elif choice not in (AUTO, NONE, REQUIRED):
            raise BadRequest('tool_choice must be "auto", "none", "required" or a function', param="tool_choice")
        text = body.get("text") or {}
        fmt = text.get("format") if isinstance(text, dict) else None
        json_output = False
        if choice == AUTO and fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind == "json_object":
                json_output = None
            elif kind == "json_schema":
                json_output = fmt.get("schema")
                if not isinstance(json_output, dict):
                    raise BadRequest("text.format.schema must be a JSON schema object", param="text.format")
            elif kind != "text":
                raise BadRequest('text.format.type must be "text", "json_object" or "json_schema"',
                                 param="text.format")
        return fields.output_constraint(tools, choice, parallel, json_output, choice_param="tool_choice",
                                        format_param="text.format")


# --- input items → chat messages ----------------------------------------------------------------


def input_messages(items) -> list[dict]:
    """The Responses API's input as OpenAI chat messages: a string is a user message; a message
    item's parts become text and image parts; consecutive function_call items (after an assistant
    message, or not) are that assistant turn's tool calls; function_call_output items are tool
    messages; a reasoning item's text is the next assistant turn's reasoning_content."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("input must be a string or a non-empty list of items", param="input")
    out: list[dict] = []
    reasoning = ""
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            message = {"role": item.get("role"), "content": _parts(item.get("content"), where)}
            if message["role"] == "assistant" and reasoning:
                message["reasoning_content"], reasoning = reasoning, ""
            out.append(message)
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not isinstance(call["id"], str) or not isinstance(call["function"]["name"], str):
                raise BadRequest(f"{where} must have a call_id and a name", param="input")
            if out and out[-1]["role"] == "assistant" and not reasoning:
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call],
                            **({"reasoning_content": reasoning} if reasoning else {})})
                reasoning = ""
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise BadRequest(f"{where} must have a call_id", param="input")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": _parts(item.get("output"), where)})
        elif kind == "reasoning":
            parts = item.get("content") or []
            reasoning += "".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "reasoning_text")
        elif kind == "item_reference":
            raise BadRequest(f"{where}: item references are not supported: send the item, or continue with "
                             "previous_response_id", param="input")
        else:
            raise BadRequest(f"{where}.type {kind!r} is not supported (message, function_call, function_call_output "
                             "and reasoning items are)", param="input")
    return out


def _parts(content, where: str):
    """A message's or a tool output's content: text, or text and image parts as chat messages hold them."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of parts", param="input")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal") and isinstance(part.get("text", part.get("refusal")), str):
            parts.append({"type": "text", "text": part.get("text", part.get("refusal"))})
        elif kind == "input_image":
            if part.get("image_url") is None:
                raise BadRequest(f"{where}.content[{j}]: an image must come as image_url (a data: URL); "
                                 "this server has no files", param="input")
            parts.append({"type": "input_image", "image_url": part["image_url"]})
        else:
            raise BadRequest(f"{where}.content[{j}]: parts of type {kind!r} are not supported "
                             "(input_text, output_text and input_image are)", param="input")
    return parts


def function_tools(tools):
    """The Responses API's function tools ({"type": "function", "name", "description", "parameters"})
    as chat tools; other kinds (web search, file search, …) are refused: nothing here runs them."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of function tools", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise BadRequest(f"tools[{i}]: only function tools are supported (got {kind!r})", param="tools")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def with_instructions(instructions: str | None, messages: list[dict]) -> list[dict]:
    """The conversation (prepared messages) with this request's instructions as its system prompt
    (OpenAI: a previous response's instructions are not carried over), joined with the system and
    developer messages the conversation starts with, as prepare_messages joins those for every API."""
    if not instructions:
        return messages
    try:
        return join_system(prepare_messages([{"role": "system", "content": instructions}]) + messages)
    except ChatError as e:
        raise BadRequest(str(e), param="input") from None


# --- the reply → output items and the response object -------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def output_items(reply) -> list[dict]:
    """A whole reply's output items: its reasoning, its text, its function calls."""
    items = []
    if reply.reasoning:
        items.append(_reasoning_item(_id("rs"), reply.reasoning, "completed"))
    # A reply cut off in its reasoning is that reasoning alone, as OpenAI answers it; one that wrote
    # only blanks (and no call) is still a message.
    if reply.content or not (reply.reasoning or reply.tool_calls):
        items.append(_message_item(_id("msg"), reply.content, "completed"))
    for call in reply.tool_calls:
        items.append(_call_item(_id("fc"), call, json.dumps(call["function"]["arguments"], ensure_ascii=False),
                                "completed"))
    return items


def _reasoning_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def _message_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [_output_text(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call: dict, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call["id"], "name": call["function"]["name"],
            "arguments": arguments, "status": status}


class _Turn:
    """One request: the session's arguments, and what its response object says."""

    def __init__(self, model_name: str, body: dict, kwargs: dict, messages: list[dict], images: dict,
                 store: bool) -> None:
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.model = model_name
        self.body = body
        self.kwargs = kwargs
        self.messages = messages  # the conversation without the instructions
        self.images = images
        self.store = store
        self.stream = bool(body.get("stream"))

    def response(self, status: str, *, output=(), usage=None, error=None, incomplete=None) -> dict:
        body = self.body
        text = body.get("text") if isinstance(body.get("text"), dict) else {}
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None,
                "error": error, "incomplete_details": incomplete, "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"), "model": self.model, "output": list(output),
                "parallel_tool_calls": body.get("parallel_tool_calls", True),
                "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": reasoning.get("effort"), "summary": None}, "store": self.store,
                "temperature": body.get("temperature"), "text": {"format": text.get("format") or {"type": "text"}},
                "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
                "top_p": body.get("top_p"), "truncation": "disabled", "usage": usage,
                "metadata": body.get("metadata") or {}}

    def finish(self, reply, output: list[dict], store: ResponseStore) -> dict:
        """The final response object; stored, with the conversation it ends, unless `store` is false."""
        incomplete = reply.finish_reason in ("length", "context", "loop")
        response = self.response("incomplete" if incomplete else "completed", output=output, usage=usage(reply),
                                  incomplete={"reason": "max_output_tokens"} if incomplete else None)
        if self.store:
            said = {"role": "assistant", "content": reply.content}
            if reply.reasoning:  # (the template shows it in a tool loop: as the model wrote it)
                said["reasoning_content"] = reply.reasoning
            if reply.tool_calls:
                said["tool_calls"] = reply.tool_calls
            messages = self.messages + [said]
            shown = {p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
                     if p.get("type") == "image"}
            text = len(json.dumps(messages, ensure_ascii=False)) + len(json.dumps(response, ensure_ascii=False))
            store.put(StoredResponse(self.id, messages, {k: v for k, v in self.images.items() if k in shown},
                                     response, text))
        return response


def usage(reply) -> dict:
    stats = reply.stats
    cached = stats.get("cached_tokens", 0)
    prompt = cached + stats.get("prompt_tokens", 0)
    output = stats.get("gen_tokens", 0)
    # (cache_write_tokens: a field the SDK's types require; nothing here is written to a cache that bills)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": stats.get("reasoning_tokens", 0)},
            "total_tokens": prompt + output}


class _Events:
    """A streamed reply as the Responses API's events: each run of reasoning, of text, and each
    function call is an output item, added, filled by deltas and done, in the order written."""

    def __init__(self, turn: _Turn) -> None:
        self.turn = turn
        self.sequence = 0
        self.items: list[dict] = []  # the items done
        self._open: dict | None = None  # the item being written: its kind, id, text so far
        self._blank = ""  # whitespace not yet shown (a message item opens at its first visible text)

    def emit(self, kind: str, **data) -> str:
        event = sse({"type": kind, "sequence_number": self.sequence, **data}, kind)
        self.sequence += 1
        return event

    def piece(self, piece) -> list[str]:
        if piece.kind == "reasoning":
            return self._text("reasoning", piece.text)
        if piece.kind == "content":
            return self._text("message", piece.text)
        if piece.kind == "tool_call_start":
            events = self.close()
            self._open = {"kind": "function_call", "id": _id("fc"), "call": piece.call, "text": ""}
            return events + [self._added(_call_item(self._open["id"], piece.call, "", "in_progress"))]
        if piece.kind == "tool_call_arguments" and self._open and self._open["kind"] == "function_call":
            self._open["text"] += piece.text
            return [self.emit("response.function_call_arguments.delta", item_id=self._open["id"],
                              output_index=len(self.items), delta=piece.text)]
        if piece.kind == "tool_call" and self._open and self._open["kind"] == "function_call":
            self._open["call"] = piece.call
            self._open["text"] = json.dumps(piece.call["function"]["arguments"], ensure_ascii=False)
            return self.close()
        return []  # notices are for people at a terminal

    def _text(self, kind: str, text: str) -> list[str]:
        events = []
        if self._open is None or self._open["kind"] != kind:
            if kind == "message" and not (self._blank + text).strip():
                self._blank += text
                return []
            events = self.close()
            text, self._blank = (self._blank + text if kind == "message" else text), ""
            self._open = {"kind": kind, "id": _id("rs" if kind == "reasoning" else "msg"), "text": ""}
            index, item_id = len(self.items), self._open["id"]
            if kind == "reasoning":
                events += [self._added(_reasoning_item(item_id, None, "in_progress")),
                           self.emit("response.content_part.added", item_id=item_id, output_index=index,
                                     content_index=0, part={"type": "reasoning_text", "text": ""})]
            else:
                events += [self._added(_message_item(item_id, None, "in_progress")),
                           self.emit("response.content_part.added", item_id=item_id, output_index=index,
                                     content_index=0, part=_output_text(""))]
        self._open["text"] += text
        if kind == "reasoning":
            return events + [self.emit("response.reasoning_text.delta", item_id=self._open["id"],
                                       output_index=len(self.items), content_index=0, delta=text)]
        return events + [self.emit("response.output_text.delta", item_id=self._open["id"],
                                   output_index=len(self.items), content_index=0, delta=text, logprobs=[])]

    def _added(self, item: dict) -> str:
        return self.emit("response.output_item.added", output_index=len(self.items), item=item)

    def close(self) -> list[str]:
        """The events that end the open item, if any."""
        item, self._open, self._blank = self._open, None, ""
        if item is None:
            return []
        index, item_id = len(self.items), item["id"]
        if item["kind"] == "function_call":
            done = _call_item(item_id, item["call"], item["text"], "completed")
            events = [self.emit("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                name=done["name"], arguments=item["text"])]
        elif item["kind"] == "reasoning":
            text = item["text"].rstrip()
            done = _reasoning_item(item_id, text, "completed")
            part = done["content"][0]
            events = [self.emit("response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0,
                                text=text),
                      self.emit("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                                part=part)]
        else:
            text = item["text"].rstrip()
            done = _message_item(item_id, text, "completed")
            events = [self.emit("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                                text=text, logprobs=[]),
                      self.emit("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                                part=done["content"][0])]
        self.items.append(done)
        return events + [self.emit("response.output_item.done", output_index=index, item=done)]
