"""From a model name to a GGUF on this machine: names (names.py), Hugging Face downloads (hub.py),
the local model store (store.py) and the profile that fits this machine's memory (fit.py).

Imported by the CLI; imports convert/ (to convert what it downloads), runtime.engine (the memory
estimate, the GGUF header reader) and demo.synthetic (a release's tensor layout from its config, for
the estimate before a download), never the other way.
"""

from .errors import ModelError

__all__ = ["ModelError"]
