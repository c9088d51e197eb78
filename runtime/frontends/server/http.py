"""What every API of the server shares: errors, the generation job and its events, server-sent
events, request bodies.

An API module (chat_completions, responses, messages) parses its request into ChatSession.respond's
arguments (with fields.py), hands them to the server's worker as a Job, and turns the Pieces and the
Reply it gets back into its own shapes. Errors are raised as BadRequest and answered in the API's
own error shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Callable

MAX_BODY = 16 << 20  # bytes of one request
KEEPALIVE_S = 1.0  # an SSE comment this often while nothing else is sent


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


@dataclass
class Job:
    """One request's generation: the worker posts events to `events` (on the event loop)."""

    kwargs: dict
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # a whole reply needs no pieces: posting each would wake the loop per token
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    expect: bool = False  # not a request: a conversation to evaluate while nothing waits (Server.expect)

    def post(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


async def job_events(server, job: Job):
    """The job's events as they come: ("piece", Piece)…, then ("done", Reply) or ("error",
    BadRequest); ("idle", None) after each KEEPALIVE_S without one — a stream then writes something
    (writing to a closed connection is how it notices the client left). The job is cancelled when
    the consumer stops early (a no-op once it is done)."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield "idle", None
                continue
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        server.cancel(job)


async def whole_reply(server, request, job: Job, body: Callable, error_response: Callable):
    """The response to a request not streamed: `body(reply)` as JSON once the job is done,
    `error_response(BadRequest)` (each API's error shape), or an empty 499 if the client went away
    (its generation is then stopped)."""
    from starlette.responses import JSONResponse

    events = job_events(server, job)
    try:
        async for kind, value in events:
            if kind == "idle":
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
            elif kind == "error":
                return error_response(value)
            elif kind == "done":  # (the pieces are for streams: the reply comes whole with "done")
                return JSONResponse(body(value))
    finally:
        await events.aclose()


def images_of(messages) -> tuple[list, list[bytes]]:
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
                data = data_url(url, f"messages[{i}].content[{j}]")
                images.append(data)
                part = {"type": "image", "image": hashlib.sha256(data).hexdigest()}
            parts.append(part)
        out.append({**message, "content": parts})
    return out, images


def data_url(url, where: str) -> bytes:
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


def sse(data: dict, event: str | None = None) -> str:
    """One server-sent event; named with `event` (the Responses and Messages APIs name theirs)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_stream(events):
    from starlette.responses import StreamingResponse

    return StreamingResponse(events, media_type="text/event-stream", headers=STREAM_HEADERS)


def error_body(e: BadRequest) -> dict:
    return {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}


def error(e: BadRequest):
    from starlette.responses import JSONResponse

    # A full queue is momentary: Retry-After lets clients (the openai SDK's retries) come back soon.
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse({"error": error_body(e)}, status_code=e.status, headers=headers)


async def read_json(request):
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
