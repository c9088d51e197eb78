"""Offline chat over llama.cpp for GGUFs made by qwen35 convert.

    from qwen35.runtime import ChatSession
    with ChatSession("model.gguf") as chat:
        reply = chat.send("Hello!")
        print(reply.reasoning, reply.content, chat.stats)
"""

from .errors import ChatError, ContextFull
from .reasoning import Piece
from .session import ChatSession, Reply


def one_shot(model_path, prompt: str, *, max_tokens: int | None = 256, **options) -> str:
    """The answer to one prompt (reasoning left out), e.g. for a demo. A random-weight model
    answers with random tokens: this shows the pipeline works, not that the model knows anything."""
    with ChatSession(model_path, **options) as chat:
        return chat.send(prompt, max_tokens=max_tokens).content


__all__ = ["ChatError", "ChatSession", "ContextFull", "Piece", "Reply", "one_shot"]
