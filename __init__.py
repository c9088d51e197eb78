"""qwen35: Qwen3.5 checkpoints to GGUF, and offline chat over llama.cpp."""

__version__ = "0.1.0"
