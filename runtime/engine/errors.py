"""The exceptions a user mistake or a full context turns into (the CLI prints them as one line)."""


class ChatError(Exception):
    """Bad model file, input or environment: the message is complete and meant for the user."""

    exit_code = 1


class ContextFull(ChatError):
    """The conversation no longer fits the context window."""

    exit_code = 3


class EngineFailure(ChatError):
    """llama.cpp failed on input it should have taken (a decode that returned an error): not the user's
    mistake — a server answers it 500, not 400."""
