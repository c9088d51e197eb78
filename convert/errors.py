"""The one exception type a user mistake turns into (the CLI prints it as one line)."""


class ConvertError(Exception):
    """Bad input or environment: the message is complete and meant for the user."""
