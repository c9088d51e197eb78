"""/v1/conversations: the chat page's conversations, kept on the server in the REPL's journal.

One store, one format: each conversation is a journal (runtime/conversation/journal.py) in the
directory `qwen35 run` keeps its own in, so a conversation started in the browser is taken up by
`qwen35 run --resume` and the other way round. The page lists, reads, renames, deletes and exports
them here, and sends a message with POST /v1/conversations/{id}/messages: the server adds it to the
conversation it keeps and answers through Chat Completions' own parsing and stream
(chat_completions.py), so there is one conversation model. Each turn re-sends the whole
conversation to ChatSession.respond, whose state cache evaluates only what no earlier prompt
evaluated: switching between conversations reuses their checkpoints, and one the cache no longer
holds (after a restart of the server) is evaluated once, when the page opens it: by the idle worker
(Server.expect), while the user reads and types.

A turn runs apart from the HTTP response that streams it: a client that goes away (or POSTs
…/stop) stops the reply, and what was written of it is still recorded. Turns of one conversation
follow each other: a message sent while the last reply is being recorded waits for it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from dataclasses import dataclass, field

from ...conversation import journal as journals
from ...conversation.journal import Journal
from .chat_completions import ChatCompletions, Completion
from .http import KEEPALIVE_S, BadRequest, Job, data_url, error, error_body, read_json, sse

_ID = re.compile(r"[0-9A-Za-z_+-][0-9A-Za-z_.+-]*")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
# The page's settings, as Chat Completions fields (checked there).
SETTINGS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repeat_penalty", "max_tokens", "seed")
_STATS = ("ttft_s", "gen_tps", "gen_tokens", "prompt_tokens", "cached_tokens", "prefilled_tokens", "finish_reason")


@dataclass
class _Turn:
    """A reply under way: the worker's job, and what the HTTP stream forwards (chunks, then the end)."""

    job: Job
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None


class Conversations:
    """The routes, over a Server (its worker, key and session) and a journal directory."""

    def __init__(self, server, directory=None) -> None:
        self.server = server
        self.directory = directory or journals.state_dir()
        self.chat = ChatCompletions(server)
        self._turns: dict[str, _Turn] = {}

    def routes(self) -> list:
        from starlette.routing import Route

        base = "/v1/conversations"
        return [Route(base, self._list, methods=["GET"]),
                Route(base, self._create, methods=["POST"]),
                Route(base + "/{id}", self._read, methods=["GET"]),
                Route(base + "/{id}", self._rename, methods=["PATCH"]),
                Route(base + "/{id}", self._delete, methods=["DELETE"]),
                Route(base + "/{id}/export", self._export, methods=["GET"]),
                Route(base + "/{id}/images/{image}", self._image, methods=["GET"]),
                Route(base + "/{id}/messages", self._send, methods=["POST"]),
                Route(base + "/{id}/stop", self._stop, methods=["POST"])]

    @property
    def _model(self) -> dict:
        return self.server.session.model_fingerprint

    # --- the store ------------------------------------------------------------------------------

    async def _list(self, request):
        from starlette.responses import JSONResponse

        try:
            self.server.authorize(request)
        except BadRequest as e:
            return error(e)
        session = self.server.session
        return JSONResponse({
            "object": "list",
            "data": [self._summary(journal, entry) for journal, entry in journals.conversations(self._model,
                                                                                               self.directory)],
            "model": {"id": self.server.model_name, "vision": session.sees_images, "n_ctx": session.n_ctx,
                      "thinks": session.template.thinks_by_default()}})

    async def _create(self, request):
        from starlette.responses import JSONResponse

        try:
            self.server.authorize(request)
            body = await read_json(request) if request.headers.get("content-length", "0") != "0" else {}
            title = self._title(body)
            journal = Journal.new(self.server.model_name, self._model, self.directory, prune=False)
            journal.title = title
            journal.write([], system=None, think=None)
        except BadRequest as e:
            return error(e)
        except OSError as e:
            return error(_cannot_keep(e))
        return JSONResponse(self._summary(journal, journals.read(journal.path)), status_code=201)

    async def _read(self, request):
        from starlette.responses import JSONResponse

        try:
            journal, entry = self._find(request)
        except BadRequest as e:
            return error(e)
        if journal.id not in self._turns and (entry["messages"] or entry.get("pending")):
            self._expect(journal, entry)
        return JSONResponse({**self._summary(journal, entry), "system": entry.get("system"),
                             "think": entry.get("think"), "messages": entry["messages"],
                             "pending": entry.get("pending"), "replying": journal.id in self._turns})

    async def _rename(self, request):
        from starlette.responses import JSONResponse

        try:
            journal, entry = self._find(request)
            title = self._title(await read_json(request))
            journal.retitle(entry, title)
        except BadRequest as e:
            return error(e)
        except OSError as e:
            return error(_cannot_keep(e))
        return JSONResponse(self._summary(journal, journals.read(journal.path)))

    async def _delete(self, request):
        from starlette.responses import JSONResponse

        try:
            journal, _ = self._find(request)
        except BadRequest as e:
            return error(e)
        turn = self._turns.get(journal.id)
        if turn is not None:  # its reply stops, and is not recorded
            self.server.cancel(turn.job)
            await asyncio.wait([turn.task])
        journal.delete()
        return JSONResponse({"id": journal.id, "object": "conversation.deleted", "deleted": True})

    async def _export(self, request):
        """The conversation as a Chat Completions request would carry it: images as data: URLs."""
        from starlette.responses import JSONResponse

        try:
            journal, entry = self._find(request)
        except BadRequest as e:
            return error(e)
        kept = journal.images()
        system = [{"role": "system", "content": entry["system"]}] if entry.get("system") else []
        messages = [_exported(m, kept) for m in system + entry["messages"]]
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", journals.title_of(entry)).strip("-")[:60] or journal.id  # (ASCII)
        return JSONResponse({**self._summary(journal, entry), "model": self.server.model_name,
                             "think": entry.get("think"), "messages": messages, "pending": entry.get("pending")},
                            headers={"Content-Disposition": f'attachment; filename="{name}.json"'})

    async def _image(self, request):
        from starlette.responses import Response

        try:
            journal, _ = self._find(request)
            image_id = request.path_params["image"]
            if not _IMAGE_ID.fullmatch(image_id):
                raise BadRequest("no such image", 404, "not_found_error")
            data = journal.images().get(image_id)
            if data is None:
                raise BadRequest("no such image (it was not kept beside the conversation)", 404, "not_found_error")
        except BadRequest as e:
            return error(e)
        return Response(data, media_type=_image_type(data), headers={"Cache-Control": "private, max-age=86400",
                                                                      "X-Content-Type-Options": "nosniff"})

    def _expect(self, journal: Journal, entry: dict) -> None:
        """An opened conversation is evaluated while the user reads and types (after a restart of the
        server, or once the state cache let it go), so the reply to the next message starts sooner."""
        system = [{"role": "system", "content": entry["system"]}] if entry.get("system") else []
        messages = list(entry["messages"])
        pending = journal.pending_message(entry.get("pending"))
        if pending is not None:
            messages.append(_user(pending[0], [{"type": "image", "image": _sha(i)} for i in pending[1]
                                               if isinstance(i, bytes)]))
        self.server.expect({"messages": system + messages, "images": list(journal.images().values())})

    def _find(self, request) -> tuple[Journal, dict]:
        self.server.authorize(request)
        conversation_id = request.path_params["id"]
        path = self.directory / f"{conversation_id}.json"
        entry = journals.read(path) if _ID.fullmatch(conversation_id) else None
        if entry is None or entry.get("model") != self._model:
            raise BadRequest(f"no conversation {conversation_id!r} with this model", 404, "not_found_error")
        return Journal.of(path, entry), entry

    @staticmethod
    def _title(body) -> str | None:
        if not isinstance(body, dict) or not isinstance(body.get("title", ""), (str, type(None))):
            raise BadRequest('the body must be {"title": "…"}', param="title")
        title = " ".join((body.get("title") or "").split())
        if len(title) > 200:
            raise BadRequest("a title is at most 200 characters", param="title")
        return title or None

    def _summary(self, journal: Journal, entry: dict) -> dict:
        return {"id": journal.id, "object": "conversation", "title": journals.title_of(entry),
                "started": entry.get("started"), "updated": entry.get("updated"),
                "messages": len(entry["messages"]) + (entry.get("pending") is not None)}

    # --- a turn ---------------------------------------------------------------------------------

    async def _send(self, request):
        """Add a message (or edit one, or answer the last again) and stream the reply as Chat
        Completions chunks, then a `qwen35.turn` event: the figures and the conversation."""
        from starlette.responses import StreamingResponse

        try:
            journal, _ = self._find(request)
            body = await read_json(request)
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            earlier = self._turns.get(journal.id)
            if earlier is not None:  # its reply is recorded before this turn reads the conversation
                await asyncio.wait([earlier.task])
            journal, entry = self._find(request)
            if journal.id in self._turns:
                raise BadRequest("this conversation is replying to another message", 409, code="conversation_busy")
            history, message, new_images = self._turn(journal, entry, body)
            system = body.get("system", entry.get("system"))
            think = body.get("think", entry.get("think"))
            if system is not None and not isinstance(system, str):
                raise BadRequest("system must be a string", param="system")
            if think is not None and not isinstance(think, bool):
                raise BadRequest("think must be true, false or null", param="think")
            chat_body = {"messages": ([{"role": "system", "content": system}] if system else []) + history + [message],
                         "stream": True, "stream_options": {"include_usage": True},
                         **{name: body[name] for name in SETTINGS if body.get(name) is not None}}
            if think is not None:
                chat_body["chat_template_kwargs"] = {"enable_thinking": think}
            kwargs, options = self.chat.parse(chat_body)
            for data in new_images.values():
                journal.keep_image(data)
            kwargs["images"] = list({**journal.images(), **new_images}.values())
            job = self.server.submit(kwargs, stream=True)
            try:  # the message is kept before the reply starts: a crash loses nothing the user sent
                journal.write(history, system=system, think=think, pending=_pending(message))
            except OSError:
                self.server.cancel(job)
                raise
        except BadRequest as e:
            return error(e)
        except OSError as e:
            return error(_cannot_keep(e))
        turn = _Turn(job)
        self._turns[journal.id] = turn
        turn.task = asyncio.create_task(self._reply(turn, journal.path, entry, history, message, system, think,
                                                    Completion(self.server.model_name, options)))
        return StreamingResponse(self._stream(turn), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _turn(self, journal: Journal, entry: dict, body: dict) -> tuple[list, dict, dict[str, bytes]]:
        """The conversation before the new message, the message, and the images it brings."""
        history = list(entry["messages"])
        pending = journal.pending_message(entry.get("pending"))
        if body.get("regenerate"):
            if pending is not None:  # a message a crash left unanswered
                text, images, video = pending
                if video:
                    raise BadRequest("that message has a video: answer it in `qwen35 run --resume` (/retry)")
                kept = [i for i in images if isinstance(i, bytes)]
                parts = [{"type": "image", "image": _sha(i)} for i in kept]
                return history, _user(text, parts), {}
            while history and history[-1]["role"] == "assistant":
                history.pop()
            if not history or history[-1]["role"] != "user":
                raise BadRequest("there is no message to answer again", param="regenerate")
            return history[:-1], history[-1], {}
        text = body.get("content")
        if not isinstance(text, str):
            raise BadRequest("content must be the message's text", param="content")
        edit = body.get("edit")
        if edit is not None:
            if not isinstance(edit, int) or isinstance(edit, bool) or not 0 <= edit < len(history) \
                    or history[edit]["role"] != "user":
                raise BadRequest("edit must be the index of a user message of the conversation", param="edit")
            content = history[edit]["content"]
            parts = [p for p in content if p.get("type") != "text"] if isinstance(content, list) else []
            return history[:edit], _user(text, parts), {}
        images = body.get("images") or []
        if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
            raise BadRequest('images must be a list of {"data": "data:image/…;base64,…", "name": "…"}', param="images")
        if images and not self.server.session.sees_images:
            raise BadRequest(f"{self.server.model_name} has no vision tower (mmproj) beside it: it cannot see images",
                             param="images")
        new_images, parts = {}, []
        for i, image in enumerate(images):
            data = data_url(image.get("data"), f"images[{i}]")
            image_id = _sha(data)
            new_images[image_id] = data
            name = image.get("name")
            parts.append({"type": "image", "image": image_id, **({"name": name[:200]} if isinstance(name, str) else {})})
        if not text.strip() and not parts:
            raise BadRequest("the message is empty", param="content")
        if pending is not None:  # a message a crash left unanswered stays, before the new one
            text_before, images_before, _ = pending
            history.append(_user(text_before, [{"type": "image", "image": _sha(i)} for i in images_before
                                               if isinstance(i, bytes)]))
        return history, _user(text, parts), new_images

    async def _reply(self, turn: _Turn, path, before: dict, history: list, message: dict, system, think,
                     completion: Completion) -> None:
        """Forward the worker's events to the stream, and record the reply when it ends."""
        try:
            while True:
                kind, value = await turn.job.events.get()
                if kind == "piece":
                    for delta in completion.deltas(value):
                        turn.out.put_nowait(("chunk", completion.chunk(delta)))
                    continue
                if kind == "error":
                    self._restore(path, before)  # the turn did not happen: the message goes back to the page
                    turn.out.put_nowait(("error", value))
                    return
                reply = value
                stats = {k: reply.stats.get(k) for k in _STATS} if reply is not None else {"finish_reason": "interrupted"}
                summary = self._record(path, history, message, reply, stats, system, think)
                turn.out.put_nowait(("chunk", completion.chunk({}, completion.finish_reason(reply))))
                turn.out.put_nowait(("chunk", {**completion.chunk(None), "usage": completion.usage(reply)}))
                turn.out.put_nowait(("chunk", {"object": "qwen35.turn", "conversation": summary, "stats": stats}))
                turn.out.put_nowait(("end", None))
                return
        except BadRequest as e:
            turn.out.put_nowait(("error", e))
        except Exception as e:  # noqa: BLE001 - told to the page; the server goes on
            turn.out.put_nowait(("error", BadRequest(f"internal error: {e}", 500, "server_error")))
        finally:
            self._turns.pop(path.stem, None)

    def _record(self, path, history: list, message: dict, reply, stats: dict, system, think) -> dict | None:
        entry = journals.read(path)
        if entry is None:  # deleted meanwhile
            return None
        journal = Journal.of(path, entry)
        messages = history + [message]
        if reply is not None and reply.stats.get("ttft_s") is not None:  # (else not a token was written)
            answer = {"role": "assistant", "content": reply.content}
            if reply.reasoning:
                answer["reasoning_content"] = reply.reasoning
            messages.append({**answer, "stats": stats})
        journal.title = journal.title or journals.title_of({"messages": messages})  # kept, never pruned
        try:
            journal.write(messages, system=system, think=think)
        except OSError as e:
            raise BadRequest(str(_cannot_keep(e)), 500, "server_error") from None
        return self._summary(journal, journals.read(path))

    def _restore(self, path, before: dict) -> None:
        if journals.read(path) is not None:
            journal = Journal.of(path, before)
            try:
                journal.write(before["messages"], system=before.get("system"), think=before.get("think"),
                              pending=before.get("pending"))
            except OSError:
                pass

    async def _stream(self, turn: _Turn):
        try:
            yield ": reply\n\n"
            while True:
                try:
                    kind, value = await asyncio.wait_for(turn.out.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keepalive\n\n"  # writing to a closed connection tells us it is gone
                    continue
                if kind == "chunk":
                    yield sse(value)
                elif kind == "error":
                    yield sse({"error": error_body(value)})
                    break
                else:
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.server.cancel(turn.job)  # (a no-op once the reply ended; stops it if the page went away)

    async def _stop(self, request):
        from starlette.responses import JSONResponse

        try:
            journal, _ = self._find(request)
        except BadRequest as e:
            return error(e)
        turn = self._turns.get(journal.id)
        if turn is not None:
            self.server.cancel(turn.job)
        return JSONResponse({"id": journal.id, "stopped": turn is not None})


def _user(text: str, parts: list[dict]) -> dict:
    return {"role": "user", "content": parts + [{"type": "text", "text": text}] if parts else text}


def _pending(message: dict) -> str | dict:
    """A message as the journal keeps one not yet answered (as `qwen35 run` does: /retry answers it)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return {"text": "".join(p["text"] for p in content if p["type"] == "text"),
            "images": [{"image": p["image"]} for p in content if p["type"] == "image"], "video": None}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _exported(message: dict, kept: dict[str, bytes]) -> dict:
    content = message.get("content")
    out = {k: v for k, v in message.items() if k not in ("content", "stats")}
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") == "image" and part.get("image") in kept:
                data = kept[part["image"]]
                url = f"data:{_image_type(data)};base64,{base64.b64encode(data).decode()}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
            else:  # an image past the journal's budget, or a video: named, not carried
                parts.append({"type": "text", "text": f"[{part.get('type')} {part.get('path') or part.get('image', '')}]"})
        content = parts
    return {"role": out.pop("role"), "content": content, **out}


def _image_type(data: bytes) -> str:
    for magic, kind in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp")):
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _cannot_keep(e: OSError) -> BadRequest:
    return BadRequest(f"cannot keep the conversation: {e.strerror or e}", 500, "server_error")
