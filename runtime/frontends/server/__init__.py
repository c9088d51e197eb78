"""`qwen35 serve`: the HTTP server and its APIs.

app: the Server (one worker thread owns the model; requests queue for it), listening, the key and
the loopback rule; http: what the APIs share (errors, jobs and their events, bodies); fields: the
request fields they read alike (sampling, tool choice → constraint, the prompt check); one module
per API, each a thin translation onto ChatSession.respond: chat_completions (OpenAI's Chat
Completions), responses (OpenAI's Responses, with stored responses), messages (Anthropic's Messages); page (the chat page at /) and
conversations (its conversations, kept in the REPL's journal).
"""

from .app import IDLE_S, Server, http_port, is_loopback, listen, serve

__all__ = ["IDLE_S", "Server", "http_port", "is_loopback", "listen", "serve"]
