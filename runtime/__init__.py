"""Offline chat over llama.cpp for GGUFs made by qwen35 convert.

    from qwen35.runtime import ChatSession
    with ChatSession("model.gguf") as chat:
        reply = chat.send("Hello!")
        print(reply.reasoning, reply.content, chat.stats)

Three floors, imports flowing down only: frontends/ (the REPL, one-shot run, bench, the server) →
conversation/ (ChatSession and what a chat is) → engine/ (llama.cpp and this machine). This module
only hands on the public names. The engine (and llama.cpp's shared library) loads on first use, so
`qwen35 convert` does not pay for it.
"""

from .engine.errors import ChatError, ContextFull

_LAZY = {"ChatSession": ".conversation.session", "Reply": ".conversation.session",
         "Piece": ".conversation.reasoning", "one_shot": ".frontends.run"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ChatError", "ChatSession", "ContextFull", "Piece", "Reply", "one_shot"]
