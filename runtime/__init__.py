"""Offline chat over llama.cpp for GGUFs made by qwen35 convert.

    from qwen35.runtime import ChatSession
    with ChatSession("model.gguf") as chat:
        reply = chat.send("Hello!")
        print(reply.reasoning, reply.content, chat.stats)

The engine (and llama.cpp's shared library) loads on first use, so `qwen35 convert` does not pay for it.
"""

from .errors import ChatError, ContextFull

_LAZY = {"ChatSession": "session", "Reply": "session", "Piece": "reasoning"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def one_shot(model_path, prompt: str, *, max_tokens: int | None = 64, think: bool = False, **options) -> str:
    """The answer to one prompt, e.g. for a demo; reasoning is off unless `think=True` (a short
    budget would otherwise go to reasoning). A random-weight model answers with random tokens:
    that shows the pipeline works, not that the model knows anything."""
    from .session import ChatSession

    with ChatSession(model_path, think=think, prefill=False, **options) as chat:
        return chat.send(prompt, max_tokens=max_tokens).content


__all__ = ["ChatError", "ChatSession", "ContextFull", "Piece", "Reply", "one_shot"]
