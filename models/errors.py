"""The one exception of qwen35.models: a name that cannot be had, said in one line (the CLI prints it)."""


class ModelError(Exception):
    """A name that does not resolve, a download that failed, a store problem: the message is complete."""
