"""`qwen35 serve`: an OpenAI-compatible HTTP front end (starlette + uvicorn) over one ChatSession.

One generation runs at a time, on a worker thread that owns the model; requests wait in a bounded
queue, in order (a full queue answers 429). Each request re-sends its whole conversation; the
session's state cache (state_cache.py) makes it evaluate only the tokens no earlier prompt
evaluated, for several interleaved conversations. A client that goes away stops its generation
within a token (streams also send SSE comments while the prompt is evaluated, so a closed
connection is noticed then too). The APIs (Chat Completions, Responses, Anthropic's Messages) are
thin translations onto the same ChatSession.respond, each answering errors in its own shape, with
the right status; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import ipaddress
import queue
import sys
import threading
import time

from ...conversation.session import ChatSession
from ...engine.errors import ChatError, ContextFull, EngineFailure
from .chat_completions import ChatCompletions
from .http import BadRequest, Job, error
from .messages import Messages
from .page import Page
from .responses import Responses

# Idle this long, the worker evaluates the known start of the last conversation's next request and
# secures the live conversation (ChatSession.idle: that prefill, then a state read, ~10-30 ms on 2
# cores) so that the next conversation's request does not wait for it; a request arriving meanwhile
# stops it. A client whose next request comes sooner (an agent's quick tool, a batch of unrelated
# prompts) never waits for either.
IDLE_S = 0.2


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    def __init__(self, session: ChatSession, *, model_name: str, api_key: str | None = None,
                 queue_size: int = 16, ui: bool = True, conversations_dir=None, freeze_gc: bool = False) -> None:
        """`ui`: the chat page at / and its conversations API, kept in `conversations_dir` (default:
        where `qwen35 run` keeps its journal). `freeze_gc`: the process is the server's (`qwen35
        serve`): once idle with everything loaded, leave what it holds out of later garbage collections."""
        self.session = session
        # A full garbage collection walks every object the process holds — the server's libraries, the
        # tokenizer's and constraints' views of the vocabulary: ~118,000 objects, 50-75 ms on the AMD
        # EPYC — in the middle of whichever request it falls on (twice in 16 requests of an agent
        # loop, the first token then ~2.5x as late). Those objects live as long as the process:
        # gc.freeze() leaves them out of every later collection, which then walk only what came after.
        self._freeze_gc = freeze_gc
        self.ui, self._conversations_dir = ui, conversations_dir
        self.model_name = model_name
        self._api_key = api_key.encode() if api_key else None
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._current: Job | None = None
        self._lock = threading.Lock()  # guards _current against a cancel racing the worker
        self._worker = threading.Thread(target=self._work, name="qwen35-generation", daemon=True)
        self._worker.start()
        # Agents ask for JSON and forced calls: their grammars' view of the vocabulary is built while
        # the worker is idle (from IDLE_S after start), not in the first such request.
        session.prepare_constraints(when_idle=True)
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
                if self._freeze_gc and self.session.prepared and self._jobs.empty():
                    self._freeze_gc = False
                    gc.collect()  # (the garbage there is, not frozen with the rest)
                    gc.freeze()
                job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.post("done", None)
                continue
            if job.expect:
                try:
                    self.session.expect(**job.kwargs)
                except Exception:  # noqa: BLE001 - a guess: the next request reads what it needs itself
                    pass
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
            except EngineFailure as e:  # llama.cpp's failure, not the request's
                outcome = "error", BadRequest(str(e), 500, "server_error")
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

    def cancel(self, job: Job) -> None:
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
            return error(BadRequest(str(exc.detail), exc.status_code, kind))

        self.responses = Responses(self)
        routes = [Route("/health", self._health, methods=["GET"]),
                  Route("/v1/models", self._models, methods=["GET"]),
                  *ChatCompletions(self).routes(), *self.responses.routes(), *Messages(self).routes(),
                  *(Page(self, self._conversations_dir).routes() if self.ui else [])]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def _health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def _models(self, request):
        from starlette.responses import JSONResponse

        try:
            self.authorize(request)
        except BadRequest as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "qwen35"}]})

    def submit(self, kwargs: dict, *, stream: bool) -> Job:
        """Queue a generation (ChatSession.respond's arguments) for the worker; 429 when full."""
        job = Job(kwargs, asyncio.get_running_loop(), stream=stream)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise BadRequest("the server is busy: too many requests are waiting", 429, "rate_limit_error",
                             code="queue_full") from None
        return job

    def expect(self, kwargs: dict) -> None:
        """A conversation (ChatSession.expect's arguments) a client has opened: once no request
        waits, the worker evaluates it, as it evaluates the known start of a reply's next request.
        Skipped when requests wait."""
        try:
            self._jobs.put_nowait(Job(kwargs, asyncio.get_running_loop(), stream=False, expect=True))
        except queue.Full:
            pass

    def authorize(self, request) -> None:
        """The key as a bearer token (OpenAI clients) or in x-api-key (Anthropic clients)."""
        if self._api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), self._api_key):
            raise BadRequest("invalid API key", 401, "authentication_error", code="invalid_api_key")

def serve(model: str, *, host: str, port: int, api_key: str | None, session_options: dict,
          queue_size: int = 16, ui: bool = True) -> None:
    """Load MODEL and serve it until interrupted."""
    if not is_loopback(host) and not api_key:
        raise ChatError(f"refusing to listen on {host} (beyond this machine) without --api-key")
    with ChatSession(model, **session_options) as session:
        for warning in session.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for note in session.notes:  # (a log: what auto chose is said, as no fault)
            print(f"note: {note}", file=sys.stderr)
        server = Server(session, model_name=session.model_file.path.stem, api_key=api_key, queue_size=queue_size,
                        ui=ui, freeze_gc=True)
        http = listen(server, host, port)
        url = f"http://{host}:{http_port(http)}"
        print(f"serving {session.model_file.path.name} on {url}/v1" + (f", its chat page on {url}/" if ui else ""),
              file=sys.stderr, flush=True)
        try:
            while not http.should_exit:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            # Handlers read the session (tokenizing a request to check its fit): the HTTP thread ends
            # before the worker, and the worker before the session frees the model.
            http.should_exit = True
            http.thread.join(timeout=10)
            server.close()


def listen(server: Server, host: str, port: int):
    """Start uvicorn for `server` on a thread (port 0: any free port); returns once it listens.
    Stop it with `http.should_exit = True`."""
    import uvicorn

    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=5)
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
