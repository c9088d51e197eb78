"""Hugging Face Qwen3.5 checkpoint → GGUF."""

from .errors import ConvertError
from .pipeline import Output, convert

__all__ = ["ConvertError", "Output", "convert"]
