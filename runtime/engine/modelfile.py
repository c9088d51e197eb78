"""What `qwen35 run` needs to know about a GGUF before handing it to llama.cpp.

Reading the header ourselves turns the usual failures into one clear sentence — a missing file, a
file that is not GGUF, a truncated download, a model of another architecture — where llama.cpp would
print "failed to load model" (or abort). The same header gives the sizes for the memory estimate,
the chat template and the recommended sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...gguf_header import GGUFFormatError, GGUFHeader, TensorInfo, read_header
from .errors import ChatError

# Architectures this runtime is built for; others run with a warning if llama.cpp knows them.
QWEN35_ARCHS = ("qwen35", "qwen35moe")


@dataclass
class ModelFile:
    path: Path
    size: int
    metadata: dict = field(repr=False)
    tensors: list[TensorInfo] = field(repr=False)
    n_tokens: int = 0  # vocabulary size (the token list is counted, not read)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def sampling_defaults(self) -> dict:
        """The recommended sampling written by the converter (llama.cpp's general.sampling.* keys)."""
        names = {"temp": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repeat_penalty"}
        found = {ours: self.metadata.get(f"general.sampling.{key}") for key, ours in names.items()}
        # Stored as float32: 0.6 reads back as 0.6000000238.
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in found.items() if v is not None}


def read_model_file(path) -> ModelFile:
    header = read_gguf(path)
    return ModelFile(header.path, header.file_size, header.metadata, header.tensors,
                     header.array_length("tokenizer.ggml.tokens"))


def read_gguf(path) -> GGUFHeader:
    """The header of any GGUF the runtime is given (model or mmproj); problems as one ChatError line."""
    try:
        return read_header(path)
    except GGUFFormatError as e:
        hint = " (convert a checkpoint with `qwen35 convert`)" if str(e).endswith("is not a GGUF file") else ""
        raise ChatError(f"{e}{hint}") from None


def mtp_output_tensor(header) -> TensorInfo:
    """The output weight the MTP head's drafts are multiplied by, in llama.cpp's order of preference
    (qwen35.cpp graph_mtp: the MTP block's nextn.shared_head_head, else `output`, which is token_embd
    when the model is tied). `header`: a GGUFHeader or a ModelFile."""
    by_name = {t.name: t for t in header.tensors}
    if "output.scale" in by_name:
        raise ChatError("the output layer has a scale tensor (output.scale), which the reduced draft does not apply")
    arch = header.metadata.get("general.architecture", "")
    n_layer = header.metadata.get(f"{arch}.block_count")
    nextn = header.metadata.get(f"{arch}.nextn_predict_layers", 0)
    names = [f"blk.{int(n_layer) - int(nextn)}.nextn.shared_head_head.weight"] if n_layer is not None and nextn else []
    for name in names + ["output.weight", "token_embd.weight"]:
        if name in by_name:
            return by_name[name]
    raise ChatError("the GGUF has no output weight")
