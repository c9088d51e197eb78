"""POST /v1/chat/completions: OpenAI's Chat Completions, translated onto ChatSession.respond.

Each request re-sends its whole conversation; the session's state cache evaluates only what no
earlier prompt evaluated. Reasoning comes back as `reasoning_content` (and `reasoning`), tool calls
as OpenAI tool_calls, streamed as chat.completion.chunk events.
"""

from __future__ import annotations

import json
import time
import uuid

from ...conversation.tools import check_tools, prepare_messages
from ...engine.errors import ChatError
from . import fields
from .fields import AUTO, NONE, REQUIRED
from .http import BadRequest, Job, error, error_body, event_stream, images_of, job_events, read_json, whole_reply, sse

# Fields read and deliberately ignored (documented in docs/serve.md): no effect on a local model.
IGNORED_FIELDS = ("model", "user", "metadata", "store", "service_tier", "frequency_penalty", "logit_bias",
                  "prediction", "modalities", "audio", "web_search_options")


class ChatCompletions:
    """The route and its handler, over a Server (its worker, its key, its model's name)."""

    def __init__(self, server) -> None:
        self.server = server

    def routes(self) -> list:
        from starlette.routing import Route

        return [Route("/v1/chat/completions", self._chat, methods=["POST"])]

    async def _chat(self, request):
        try:
            self.server.authorize(request)
            body = await read_json(request)
            kwargs, options = self.parse(body)
            job = self.server.submit(kwargs, stream=options["stream"])
        except BadRequest as e:
            return error(e)
        completion = Completion(self.server.model_name, options)
        if options["stream"]:
            return event_stream(self._stream(job, completion))
        return await whole_reply(self.server, request, job, completion.message, error)

    async def _stream(self, job: Job, completion: "Completion"):
        try:
            yield sse(completion.chunk({"role": "assistant", "content": ""}))
            async for kind, value in job_events(self.server, job):
                if kind == "idle":
                    yield ": keepalive\n\n"  # writing to a closed connection tells us it is gone
                elif kind == "piece":
                    for delta in completion.deltas(value):
                        yield sse(completion.chunk(delta))
                elif kind == "error":
                    yield sse({"error": error_body(value)})
                else:
                    yield sse(completion.chunk({}, completion.finish_reason(value)))
                    if completion.options["include_usage"]:
                        yield sse({**completion.chunk(None), "usage": completion.usage(value)})
            yield "data: [DONE]\n\n"
        finally:
            self.server.cancel(job)

    # --- the request ----------------------------------------------------------------------------

    def parse(self, body) -> tuple[dict, dict]:
        """The session's arguments and the reply's options, or BadRequest."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        messages, images = images_of(body.get("messages"))
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

        think = fields.think_of_effort(body.get("reasoning_effort"), "reasoning_effort")
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
            if fields.positive_int(body, name) is not None:
                kwargs["max_tokens"] = body[name]
                break
        stop = fields.stop_strings(body.get("stop"), "stop", 4)
        if stop:
            kwargs["stop"] = stop
        seed = fields.seed(body)
        if seed is not None:
            kwargs["seed"] = seed
        kwargs.update(fields.sampling(body))
        kwargs.update(self._constraint(body, tools))
        stream_options = body.get("stream_options") or {}
        options = {"stream": bool(body.get("stream")),
                   "include_usage": bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))}
        fields.check_conversation(self.server.session, messages, tools, think, "messages")
        return kwargs, options

    @staticmethod
    def _constraint(body: dict, tools: list[dict]):
        choice = body.get("tool_choice", AUTO)
        parallel = fields.parallel_tool_calls(body)
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or not isinstance(name, str):
                raise BadRequest('tool_choice must be "auto", "none", "required" or '
                                 '{"type": "function", "function": {"name": ...}}', param="tool_choice")
            choice = name
        elif choice not in (AUTO, NONE, REQUIRED):
            raise BadRequest('tool_choice must be "auto", "none", "required" or a function', param="tool_choice")
        json_output = False
        if choice == AUTO:
            fmt = body.get("response_format")
            if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
                pass
            elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
                json_output = None
            elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
                json_output = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(json_output, dict):
                    raise BadRequest("response_format.json_schema.schema must be a JSON schema object",
                                     param="response_format")
            else:
                raise BadRequest('response_format.type must be "text", "json_object" or "json_schema"',
                                 param="response_format")
        return fields.output_constraint(tools, choice, parallel, json_output, choice_param="tool_choice",
                                        format_param="response_format")


class Completion:
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
        details = {"reasoning_tokens": stats.get("reasoning_tokens", 0)}
        if stats.get("drafted_tokens"):  # the MTP head's drafts: OpenAI's fields for a prediction's tokens
            details.update(accepted_prediction_tokens=stats["accepted_tokens"],
                           rejected_prediction_tokens=stats["drafted_tokens"] - stats["accepted_tokens"])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}, "completion_tokens_details": details}

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


def _arguments(call: dict) -> str:
    return json.dumps(call["function"]["arguments"], ensure_ascii=False)
