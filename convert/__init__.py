"""Hugging Face Qwen3.5 checkpoint → GGUF (and the vision tower's mmproj), at any quantization.

One file per job: checkpoint (reading safetensors), qwen35 and qwen35_vision (the rename tables and
transforms of the text model and the vision tower), profiles and plan (which type each tensor gets),
native_quant (llama.cpp's own quantizer), gguf_file (the writer), pipeline (one read of the
checkpoint, every asked output), info (`qwen35 info`), imatrix, tokenizer.

May import: `qwen35.gguf_header`, `qwen35.system` and `qwen35.quant_profiles`; never `qwen35.runtime`.
"""

from .errors import ConvertError
from .pipeline import Output, convert

__all__ = ["ConvertError", "Output", "convert"]
