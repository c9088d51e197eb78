"""`qwen35 serve`: an OpenAI-compatible HTTP front end (starlette + uvicorn) over one ChatSession.

One generation runs at a time, on a worker thread that owns the model; requests wait in a bounded
queue, in order (a full queue answers 429). Each request re-sends its whole conversation; the
session's state cache (state_cache.py) makes it evaluate only the tokens no earlier prompt
evaluated, for several interleaved conversations. A client that goes away stops its generation
within a token (streams also send SSE comments while the prompt is evaluated, so a closed
connection is noticed then too). Every error is OpenAI-shaped: {"error": {"message", "type",
"param", "code"}}, with the right status; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from .constraints import Constraint, json_constraint, tool_call_constraint
from .errors import ChatError, ContextFull
from .session import ChatSession
from .tools import check_tools, prepare_messages

MAX_BODY = 16 << 20  # bytes of one request
KEEPALIVE_S = 1.0  # an SSE comment this often while nothing else is sent
# Idle this long, the worker evaluates the known start of the last conversation's next request and
# secures the live conversation (ChatSession.idle: that prefill, then a state read, ~10-30 ms on 2
# cores) so that the next conversation's request does not wait for it; a request arriving meanwhile
# stops it. A client whose next request comes sooner (an agent's quick tool, a batch of unrelated
# prompts) never waits for either.
IDLE_S = 0.2

_SAMPLING_FIELDS = {"temperature": ("temp", 0, 2), "top_p": ("top_p", 0, 1), "top_k": ("top_k", 0, None),
                    "min_p": ("min_p", 0, 1), "presence_penalty": ("presence_penalty", -2, 2),
                    "repeat_penalty": ("repeat_penalty", 0, None)}
# Fields read and deliberately ignored (documented in the README): no effect on a local model.
IGNORED_FIELDS = ("model", "user", "metadata", "store", "service_tier", "frequency_penalty", "logit_bias",
                  "prediction", "modalities", "audio", "web_search_options")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Job:
    """One request's generation: the worker posts events to `events` (on the event loop)."""

    kwargs: dict
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # a whole reply needs no pieces: posting each would wake the loop per token
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Server:
    def __init__(self, session: ChatSession, *, model_name: str, api_key: str | None = None,
                 queue_size: int = 16) -> None:
        self.session = session
        self.model_name = model_name
        self._api_key = api_key.encode() if api_key else None
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._current: _Job | None = None
        self._lock = threading.Lock()  # guards _current against a cancel racing the worker
        self._worker = threading.Thread(target=self._work, name="qwen35-generation", daemon=True)
        self._worker.start()
        self.app = self._make_app()

    # --- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_S)
            except queue.Empty:
                try:
                    self.session.idle(busy=lambda: not self._jobs.empty())
                except Exception:  # noqa: BLE001 - then the next switch reads the state itself
                    pass
                job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.post("done", None)
                continue
            with self._lock:
                self._current = job
            try:
                pieces = self.session.respond(**job.kwargs)
                if job.cancelled.is_set():
                    self.session.interrupt()
                for piece in pieces:
                    if job.stream:
                        job.post("piece", piece)
                outcome = "done", self.session.last_reply
            except ContextFull as e:
                outcome = "error", BadRequest(str(e), code="context_length_exceeded")
            except ChatError as e:
                outcome = "error", BadRequest(str(e))
            except Exception as e:  # noqa: BLE001 - reported to the client, and the server goes on
                outcome = "error", BadRequest(f"internal error: {e}", 500, "server_error")
            # The job stops being current before its handler hears the outcome: the handler's
            # closing _cancel must then find nothing to interrupt (it set the session's stop flag
            # for whatever ran next, which cut the idle prefill short).
            with self._lock:
                self._current = None
            job.post(*outcome)

    def _cancel(self, job: _Job) -> None:
        job.cancelled.set()
        with self._lock:
            if self._current is job:
                self.session.interrupt()

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.cancelled.set()
                self.session.interrupt()
        try:
            self._jobs.put(None, timeout=5)
        except queue.Full:
            pass
        self._worker.join(timeout=30)

    # --- HTTP -----------------------------------------------------------------------------------

    def _make_app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        async def http_error(request, exc):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return _error(BadRequest(str(exc.detail), exc.status_code, kind))

        routes = [Route("/health", self._health, methods=["GET"]),
                  Route("/v1/models", self._models, methods=["GET"]),
                  Route("/v1/chat/completions", self._chat, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def _health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def _models(self, request):
        from starlette.responses import JSONResponse

        try:
            self._authorize(request)
        except BadRequest as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "qwen35"}]})

    async def _chat(self, request):
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            self._authorize(request)
            body = await _read_json(request)
            kwargs, options = self._parse(body)
            job = _Job(kwargs, asyncio.get_running_loop(), stream=options["stream"])
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                raise BadRequest("the server is busy: too many requests are waiting", 429, "rate_limit_error",
                                 code="queue_full") from None
        except BadRequest as e:
            return _error(e)
        completion = _Completion(self.model_name, options)
        if options["stream"]:
            return StreamingResponse(self._stream(job, completion), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self._cancel(job)
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "error":
                    return _error(value)
                if kind == "done":  # (the pieces are for streams: the reply comes whole with "done")
                    return JSONResponse(completion.message(value))
        finally:
            self._cancel(job)  # (a no-op once done; stops the generation if the handler is cancelled)

    async def _stream(self, job: _Job, completion: "_Completion"):
        try:
            yield _sse(completion.chunk({"role": "assistant", "content": ""}))
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keepalive\n\n"  # writing to a closed connection tells us it is gone
                    continue
                if kind == "piece":
                    for delta in completion.deltas(value):
                        yield _sse(completion.chunk(delta))
                elif kind == "error":
                    yield _sse({"error": _error_body(value)})
                    break
                else:
                    yield _sse(completion.chunk({}, completion.finish_reason(value)))
                    if completion.options["include_usage"]:
                        yield _sse({**completion.chunk(None), "usage": completion.usage(value)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            self._cancel(job)

    def _authorize(self, request) -> None:
        if self._api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self._api_key):
            raise BadRequest("invalid API key", 401, "authentication_error", code="invalid_api_key")

    # --- the request ----------------------------------------------------------------------------

    def _parse(self, body) -> tuple[dict, dict]:
        """The session's arguments and the reply's options, or BadRequest."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        messages, images = _images_of(body.get("messages"))
        try:
            messages = prepare_messages(messages)
            tools = check_tools(body.get("tools"))
        except ChatError as e:
            raise BadRequest(str(e), param="messages" if "messages" in str(e) else "tools") from None
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported", param="n")
        if body.get("logprobs"):
            raise BadRequest("logprobs are not supported", param="logprobs")
        kwargs: dict = {"messages": messages, "images": images, "tools": tools}

        think = None
        effort = body.get("reasoning_effort")
        if effort is not None:
            if effort not in ("none", "minimal", "low", "medium", "high"):
                raise BadRequest("reasoning_effort must be none, minimal, low, medium or high", param="reasoning_effort")
            think = effort != "none"
        template_kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(template_kwargs, dict):
            raise BadRequest("chat_template_kwargs must be an object", param="chat_template_kwargs")
        if "enable_thinking" in template_kwargs:
            if not isinstance(template_kwargs["enable_thinking"], bool):
                raise BadRequest("chat_template_kwargs.enable_thinking must be true or false",
                                 param="chat_template_kwargs")
            think = template_kwargs["enable_thinking"]
        kwargs["think"] = think

        for name in ("max_completion_tokens", "max_tokens"):
            value = body.get(name)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise BadRequest(f"{name} must be a positive integer", param=name)
                kwargs["max_tokens"] = value
                break
        stop = body.get("stop")
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
                raise BadRequest("stop must be a string or a list of up to 4 strings", param="stop")
            kwargs["stop"] = stop
        seed = body.get("seed")
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise BadRequest("seed must be an integer", param="seed")
            kwargs["seed"] = seed & 0xFFFFFFFF
        for name, (option, low, high) in _SAMPLING_FIELDS.items():
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low \
                    or (high is not None and value > high):
                raise BadRequest(f"{name} must be a number between {low} and {high if high is not None else 'any'}",
                                 param=name)
            kwargs[option] = int(value) if option == "top_k" else float(value)

        kwargs["constraint"], kwargs["read_tool_calls"] = self._constraint(body, tools)
        stream_options = body.get("stream_options") or {}
        options = {"stream": bool(body.get("stream")),
                   "include_usage": bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))}
        # The template refuses some conversations (e.g. no user message): say so now, as a 400.
        try:
            prompt = self.session.template.render(messages, add_generation_prompt=True, think=think, tools=tools)
        except ChatError as e:
            raise BadRequest(str(e), param="messages") from None
        if len(self.session.tokenize(prompt)) >= self.session.n_ctx:
            raise BadRequest(f"the conversation does not fit the {self.session.n_ctx}-token context",
                             param="messages", code="context_length_exceeded")
        return kwargs, options

    @staticmethod
    def _constraint(body: dict, tools: list[dict]) -> tuple[Constraint | None, bool]:
        choice = body.get("tool_choice", "auto")
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise BadRequest("parallel_tool_calls must be true or false", param="parallel_tool_calls")
        try:
            if choice == "none":
                return Constraint(forbid_tool_calls=True), False
            if choice == "required":
                return tool_call_constraint(tools, None, parallel), True
            if isinstance(choice, dict):
                name = (choice.get("function") or {}).get("name")
                if choice.get("type") != "function" or not isinstance(name, str):
                    raise BadRequest('tool_choice must be "auto", "none", "required" or '
                                     '{"type": "function", "function": {"name": ...}}', param="tool_choice")
                return tool_call_constraint(tools, name, False), True
            if choice != "auto":
                raise BadRequest('tool_choice must be "auto", "none", "required" or a function', param="tool_choice")
            fmt = body.get("response_format")
            if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
                return None, True
            if isinstance(fmt, dict) and fmt.get("type") == "json_object":
                return json_constraint(None), False
            if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise BadRequest("response_format.json_schema.schema must be a JSON schema object",
                                     param="response_format")
                return json_constraint(schema), False
            raise BadRequest('response_format.type must be "text", "json_object" or "json_schema"',
                             param="response_format")
        except ChatError as e:
            raise BadRequest(str(e), param="tool_choice" if choice != "auto" else "response_format") from None


class _Completion:
    """The reply being built, as OpenAI's chat.completion and chat.completion.chunk objects."""

    def __init__(self, model_name: str, options: dict) -> None:
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model_name
        self.options = options
        self._n_calls = 0

    def deltas(self, piece) -> list[dict]:
        if piece.kind == "reasoning":
            return [{"reasoning_content": piece.text}]
        if piece.kind == "content":
            return [{"content": piece.text}]
        if piece.kind == "tool_call_start":  # index, id, type and name once; then the arguments as they come
            self._n_calls += 1
            call = piece.call
            return [{"tool_calls": [{"index": self._n_calls - 1, "id": call["id"], "type": "function",
                                     "function": {"name": call["function"]["name"], "arguments": ""}}]}]
        if piece.kind == "tool_call_arguments":
            return [{"tool_calls": [{"index": self._n_calls - 1, "function": {"arguments": piece.text}}]}]
        return []  # a complete call was streamed already; notices are for people at a terminal

    def chunk(self, delta: dict | None, finish_reason: str | None = None) -> dict:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    @staticmethod
    def finish_reason(reply) -> str:
        if reply is None:
            return "stop"
        if reply.tool_calls and not reply.call_cut_off:
            return "tool_calls"  # (even if cut short after the calls, before `</tool_call>`, say)
        if reply.finish_reason in ("length", "context", "loop"):
            return "length"  # also for a call cut short: its arguments are what was written
        return "stop"

    @staticmethod
    def usage(reply) -> dict:
        stats = reply.stats if reply else {}
        cached = stats.get("cached_tokens", 0)
        prompt = cached + stats.get("prompt_tokens", 0)
        completion = stats.get("gen_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def message(self, reply) -> dict:
        message = {"role": "assistant", "content": reply.content if reply.content or not reply.tool_calls else None}
        if reply.reasoning:
            message["reasoning_content"] = message["reasoning"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"], "arguments": _arguments(c)}} for c in reply.tool_calls]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": self.finish_reason(reply)}],
                "usage": self.usage(reply)}


def _images_of(messages) -> tuple[list, list[bytes]]:
    """The messages with each OpenAI image part ({"type": "image_url", "image_url": {"url": "data:…"}},
    or the Responses API's "input_image") made the session's {"type": "image", "image": <SHA-256>},
    and the images' bytes. Only data: URLs: the server never fetches anything from the network."""
    if not isinstance(messages, list):
        return messages, []
    images: list[bytes] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in ("image_url", "input_image"):
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                data = _data_url(url, f"messages[{i}].content[{j}]")
                images.append(data)
                part = {"type": "image", "image": hashlib.sha256(data).hexdigest()}
            parts.append(part)
        out.append({**message, "content": parts})
    return out, images


def _data_url(url, where: str) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest(f"{where}: send the image in a data: URL (data:image/png;base64,…); this server "
                         "fetches nothing from the network", param="messages")
    head, comma, payload = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise BadRequest(f"{where}: the image's data: URL must be base64 (data:image/png;base64,…)", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise BadRequest(f"{where}: the image's data: URL is not valid base64", param="messages") from None


def _arguments(call: dict) -> str:
    return json.dumps(call["function"]["arguments"], ensure_ascii=False)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error_body(e: BadRequest) -> dict:
    return {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}


def _error(e: BadRequest):
    from starlette.responses import JSONResponse

    # A full queue is momentary: Retry-After lets clients (the openai SDK's retries) come back soon.
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse({"error": _error_body(e)}, status_code=e.status, headers=headers)


async def _read_json(request):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise BadRequest(f"the request body is larger than {MAX_BODY >> 20} MiB", 413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise BadRequest(f"the request body is larger than {MAX_BODY >> 20} MiB", 413)
    try:
        return json.loads(data)
    except ValueError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None


def serve(model: str, *, host: str, port: int, api_key: str | None, session_options: dict,
          queue_size: int = 16) -> None:
    """Load MODEL and serve it until interrupted."""
    if not is_loopback(host) and not api_key:
        raise ChatError(f"refusing to listen on {host} (beyond this machine) without --api-key")
    with ChatSession(model, **session_options) as session:
        for warning in session.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        server = Server(session, model_name=session.model_file.path.stem, api_key=api_key, queue_size=queue_size)
        http = listen(server, host, port)
        print(f"serving {session.model_file.path.name} on http://{host}:{http_port(http)}/v1", file=sys.stderr,
              flush=True)
        try:
            while not http.should_exit:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            http.should_exit = True
            server.close()


def listen(server: Server, host: str, port: int):
    """Start uvicorn for `server` on a thread (port 0: any free port); returns once it listens.
    Stop it with `http.should_exit = True`."""
    import uvicorn

    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", lifespan="off")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, name="qwen35-http", daemon=True)
    thread.start()
    while not http.started:
        if not thread.is_alive():
            raise ChatError(f"cannot listen on {host}:{port} (in use, or not an address of this machine?)")
        time.sleep(0.01)
    http.thread = thread
    return http


def http_port(http) -> int:
    return http.servers[0].sockets[0].getsockname()[1]
