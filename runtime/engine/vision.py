"""Images for the one engine: an mmproj file (the vision tower) run by llama.cpp's mtmd over a
`native.Model`, through llama-cpp-python's `mtmd_cpp` bindings.

A `Projector` turns a prompt holding image markers into chunks (runs of text tokens, and images),
encodes an image chunk into embeddings, and evaluates a chunk into a `native.Context`. Positions:
Qwen3.5 uses M-RoPE, so an image of nx × ny merged patches fills nx·ny cells of the KV cache but
advances the position by only max(nx, ny); callers track cells and positions apart (`Chunk.n_tokens`,
`Chunk.n_pos`). Facts read from the pinned sdist's tools/mtmd (mtmd.cpp, clip.cpp).

Everything llama.cpp would abort on is checked here first: the file must be an mmproj whose output
width is the text model's embedding width, and an image must decode.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import native
from .errors import ChatError, ContextFull
from .modelfile import ModelFile, read_gguf

MIN_IMAGE_TOKENS = 8  # clip.cpp's floor for the Qwen-VL projectors
# The default bound on an image's tokens (llama.cpp's own is 4096): the cost of encoding on a CPU
# against detail; grounding wants at least 1024 (clip.cpp warns below that). VISION.md §2.
DEFAULT_IMAGE_MAX_TOKENS = 1024
LLAMA_IMAGE_MAX_TOKENS = 4096  # clip.cpp's bound for the Qwen-VL projectors when none is given
IMAGE_FORMATS = "JPEG, PNG, WebP, BMP or GIF"


def _mtmd():
    # Imported on first use: loading libmtmd costs time a text-only chat need not spend.
    from llama_cpp import mtmd_cpp

    return mtmd_cpp


@dataclass(frozen=True)
class Chunk:
    """One piece of a tokenized multimodal prompt: text tokens, or one image."""

    ptr: int  # mtmd_input_chunk*, owned by the Chunks it came from
    is_image: bool
    n_tokens: int  # KV cells it fills
    n_pos: int  # positions it advances (max(nx, ny) for an image under M-RoPE)
    tokens: tuple[int, ...]  # text chunks only
    image_id: str  # image chunks only: mtmd's id of the bitmap (a hash of its pixels)


class Chunks:
    """The chunks of one tokenized prompt; frees them on close."""

    def __init__(self, ptr) -> None:
        m = _mtmd()
        self._ptr = ptr
        self.items: list[Chunk] = []
        for i in range(m.mtmd_input_chunks_size(ptr)):
            c = m.mtmd_input_chunks_get(ptr, i)
            kind = m.mtmd_input_chunk_get_type(c)
            if kind == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                data = m.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                tokens = tuple(data[j] for j in range(n.value))
                self.items.append(Chunk(c, False, len(tokens), len(tokens), tokens, ""))
            elif kind == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                image_id = (m.mtmd_input_chunk_get_id(c) or b"").decode()
                self.items.append(Chunk(c, True, m.mtmd_input_chunk_get_n_tokens(c), m.mtmd_input_chunk_get_n_pos(c),
                                        (), image_id))
            else:
                raise ChatError("the prompt holds audio, which this runtime does not take")

    def close(self) -> None:
        if self._ptr:
            _mtmd().mtmd_input_chunks_free(self._ptr)
            self._ptr = None


class Image:
    """A decoded image (RGB), ready for `Projector.tokenize`."""

    def __init__(self, ptr, source: str) -> None:
        self.ptr, self.source = ptr, source
        m = _mtmd()
        self.width, self.height = m.mtmd_bitmap_get_nx(ptr), m.mtmd_bitmap_get_ny(ptr)

    def close(self) -> None:
        if self.ptr:
            _mtmd().mtmd_bitmap_free(self.ptr)
            self.ptr = None


def read_image(source) -> tuple[bytes, str]:
    """The encoded bytes of an image given as a path or as bytes, and how to name it in errors."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "the image bytes"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ChatError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ChatError(f"cannot read {path}: {e.strerror}") from None
    if not data:
        raise ChatError(f"{name} is empty")
    return data, name


def find_mmproj(model_file: ModelFile) -> tuple[Path | None, Path]:
    """The mmproj beside a model, named as `qwen35 convert` writes it (<general.name>-mmproj-<TYPE>.gguf,
    F16 first: the converter's default); or None, and the name of the file it looked for."""
    from ...convert.pipeline import mmproj_file_name
    from ...convert.qwen35_vision import MMPROJ_TYPES

    name = str(model_file.metadata.get("general.name") or model_file.path.stem)
    candidates = [model_file.path.parent / mmproj_file_name(name, t) for t in dict.fromkeys(["f16", *MMPROJ_TYPES])]
    return next((p for p in candidates if p.is_file()), None), candidates[0]


class Projector:
    """An mmproj file loaded for one text model."""

    def __init__(self, mmproj_path, model: native.Model, n_embd: int, *, threads: int,
                 image_max_tokens: int | None = None) -> None:
        header = read_gguf(mmproj_path)
        meta = header.metadata
        if meta.get("general.type") != "mmproj" and meta.get("general.architecture") != "clip":
            raise ChatError(f"{header.path} is not an mmproj file (it is a '{meta.get('general.architecture', '?')}' "
                            "model); the vision tower is the <name>-mmproj-<TYPE>.gguf that `qwen35 convert` writes")
        if not meta.get("clip.has_vision_encoder", False):
            raise ChatError(f"{header.path} has no vision encoder")
        width = meta.get("clip.vision.projection_dim")
        if width != n_embd:
            raise ChatError(f"{header.path} belongs to another model: its image embeddings are {width} wide, "
                            f"this model's tokens are {n_embd}")
        if image_max_tokens is not None and image_max_tokens < MIN_IMAGE_TOKENS:
            raise ChatError(f"image_max_tokens must be at least {MIN_IMAGE_TOKENS}")
        m = _mtmd()
        # mtmd logs through its own hooks: into the runtime's log, quiet unless verbose.
        m.mtmd_log_set(native.log.callback, None)
        m.mtmd_helper_log_set(native.log.callback, None)
        params = m.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        if image_max_tokens is not None:
            params.image_max_tokens = image_max_tokens
        native.log.clear()
        self._ctx = m.mtmd_init_from_file(str(header.path).encode(), model.ptr, params)
        if not self._ctx:
            reason = native.log.find("error", "failed") or "llama.cpp gave no reason"
            raise ChatError(f"llama.cpp could not load the mmproj {header.path}: {reason}")
        self.path = header.path
        self.n_embd = n_embd
        self.marker = m.mtmd_default_marker().decode()
        self.uses_mrope = bool(m.mtmd_decode_use_mrope(self._ctx))

    def image(self, source, *, name: str | None = None, mergeable: bool = False) -> Image:
        """An image from a path or from its encoded bytes (JPEG, PNG, WebP, BMP, GIF); `name` says
        which, in errors, when the bytes came from a file. `mergeable`: a video frame, which mtmd
        merges with the next mergeable one of the same size into one image (a temporal patch)."""
        data, read_name = read_image(source)
        name = name or read_name
        m = _mtmd()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ptr = m.mtmd_helper_bitmap_init_from_buf(self._ctx, buf, len(data), False)
        if not ptr:
            raise ChatError(f"{name} is not an image llama.cpp can decode ({IMAGE_FORMATS}), or it is truncated")
        if mergeable:
            m.mtmd_bitmap_set_mergeable(ptr, True)
        return Image(ptr, name)

    def tokenize(self, text: str, images: list[Image]) -> Chunks:
        """Chunks of `text`, where each `self.marker` stands for the next of `images`; mtmd wraps
        every image in <|vision_start|> … <|vision_end|> itself."""
        if text.count(self.marker) != len(images):
            raise ChatError(f"the prompt has {text.count(self.marker)} image markers for {len(images)} images")
        m = _mtmd()
        data = text.encode("utf-8")
        inp = m.mtmd_input_text(data, len(data), False, True)
        bitmaps = (m.mtmd_bitmap_p_ctypes * max(1, len(images)))(*[i.ptr for i in images])
        out = m.mtmd_input_chunks_init()
        rc = m.mtmd_tokenize(self._ctx, out, ctypes.byref(inp), bitmaps, len(images))
        if rc != 0:
            m.mtmd_input_chunks_free(out)
            raise ChatError(f"llama.cpp could not tokenize the prompt with its images (code {rc})")
        return Chunks(out)

    def encode(self, chunk: Chunk) -> np.ndarray:
        """The image's embeddings, [n_tokens, n_embd] float32: what the text model will see."""
        assert chunk.is_image
        m = _mtmd()
        if m.mtmd_encode_chunk(self._ctx, chunk.ptr) != 0:
            raise ChatError("llama.cpp could not encode the image")
        out = m.mtmd_get_output_embd(self._ctx)
        return np.ctypeslib.as_array(out, shape=(chunk.n_tokens * self.n_embd,)).reshape(chunk.n_tokens, -1).copy()

    def eval(self, ctx: native.Context, chunk: Chunk, pos: int, *, logits_last: bool, cells: int | None = None) -> int:
        """Encode (for an image) and decode `chunk` at position `pos`, into a context holding
        `cells` KV cells (default: `pos`); returns the next position."""
        if (pos if cells is None else cells) + chunk.n_tokens > ctx.n_ctx:
            raise ContextFull(f"context full ({ctx.n_ctx} tokens): the image takes {chunk.n_tokens}")
        m = _mtmd()
        new_pos = native.L.llama_pos(0)
        native.log.clear()
        rc = m.mtmd_helper_eval_chunk_single(self._ctx, ctx.ptr, chunk.ptr, pos, native.SEQ, ctx.n_batch,
                                             logits_last, ctypes.byref(new_pos))
        if rc != 0:
            raise ChatError(f"llama.cpp could not evaluate the image (code {rc}): "
                            f"{native.log.find('error', 'failed') or 'no reason given'}")
        return new_pos.value

    def close(self) -> None:
        if self._ctx:
            _mtmd().mtmd_free(self._ctx)
            self._ctx = None
