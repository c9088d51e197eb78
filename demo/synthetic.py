"""Random-weight Qwen3.5 checkpoints in the real release layout, for tests and benchmarks.

`write_checkpoint` turns a `config.json` dict into a Hugging Face checkpoint directory whose tensor
names, shapes, dtypes and sharding match the Qwen3.5 releases (their safetensors index files),
filled with random values. Only numpy and the standard library are used: the safetensors files are
written by a small streaming writer, so even a checkpoint with real 0.8B dimensions (a 248320 x 1024
embedding, ~0.9 B parameters) needs only a few tens of MB of memory.

Values are true random draws (numpy's PCG64 generator, float32 normals), not a tiled block: a tiled
block would be faster but would make rows repeat, which hides transposition and reordering bugs in
anything that compares tensors. Generation runs at roughly 10 ns per parameter.

Tokenizer files are not written here; callers add them (see `qwen35.demo.real_vocab`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["write_checkpoint"]

# Elements generated per step: bounds memory (4 buffers of this many 32-bit values) whatever the
# tensor size, e.g. the 254M-element embedding or a fused expert block.
_CHUNK_ELEMENTS = 1 << 22

_MATRIX_STD = 0.02
# Qwen3.5 RMSNorm weights are stored as offsets from 1 (the model computes x * (1 + w)).
_NORM_OFFSET_STD = 0.02

_DTYPE_BYTES = {"BF16": 2, "F32": 4}

Fill = Callable[[np.random.Generator, np.ndarray], None]


def _normal(std: float, mean: float = 0.0) -> Fill:
    def fill(rng: np.random.Generator, out: np.ndarray) -> None:
        rng.standard_normal(out=out, dtype=np.float32)
        out *= np.float32(std)
        if mean:
            out += np.float32(mean)

    return fill


def _log_uniform(low: float, high: float) -> Fill:
    """log(U(low, high)): the range of Gated DeltaNet's A_log (A = exp(A_log) in [low, high])."""

    def fill(rng: np.random.Generator, out: np.ndarray) -> None:
        rng.random(out=out, dtype=np.float32)
        out *= np.float32(high - low)
        out += np.float32(low)
        np.log(out, out=out)

    return fill


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype: "BF16" or "F32"
    fill: Fill

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES[self.dtype]


def _matrix(name: str, *shape: int) -> _Tensor:
    return _Tensor(name, shape, "BF16", _normal(_MATRIX_STD))


def _offset_norm(name: str, size: int) -> _Tensor:
    return _Tensor(name, (size,), "BF16", _normal(_NORM_OFFSET_STD))


# --- the layout ---------------------------------------------------------------------------------


def _text_params(config: dict) -> dict:
    """Text hyper-parameters: `text_config` over the root (some keys, e.g. tie_word_embeddings,
    may live only at the root)."""
    return {**config, **config.get("text_config", {})}


def _ffn_tensors(p: str, text: dict, experts: str) -> list[_Tensor]:
    """The MLP of one decoder layer under prefix `p` (ending in "mlp.")."""
    hidden = text["hidden_size"]
    if "num_experts" not in text:
        inter = text["intermediate_size"]
        return [
            _matrix(p + "gate_proj.weight", inter, hidden),
            _matrix(p + "up_proj.weight", inter, hidden),
            _matrix(p + "down_proj.weight", hidden, inter),
        ]

    n_experts = text["num_experts"]
    expert_inter = text["moe_intermediate_size"]
    shared_inter = text["shared_expert_intermediate_size"]
    tensors = [_matrix(p + "gate.weight", n_experts, hidden)]
    if experts == "fused":
        # The BF16 release: gate and up stacked along dim 1, and no ".weight" suffix.
        tensors += [
            _matrix(p + "experts.gate_up_proj", n_experts, 2 * expert_inter, hidden),
            _matrix(p + "experts.down_proj", n_experts, hidden, expert_inter),
        ]
    else:
        for j in range(n_experts):
            e = f"{p}experts.{j}."
            tensors += [
                _matrix(e + "gate_proj.weight", expert_inter, hidden),
                _matrix(e + "up_proj.weight", expert_inter, hidden),
                _matrix(e + "down_proj.weight", hidden, expert_inter),
            ]
    tensors += [
        _matrix(p + "shared_expert.gate_proj.weight", shared_inter, hidden),
        _matrix(p + "shared_expert.up_proj.weight", shared_inter, hidden),
        _matrix(p + "shared_expert.down_proj.weight", hidden, shared_inter),
        _matrix(p + "shared_expert_gate.weight", 1, hidden),
    ]
    return tensors


def _full_attention_tensors(p: str, text: dict) -> list[_Tensor]:
    hidden = text["hidden_size"]
    head_dim = text["head_dim"]
    n_heads = text["num_attention_heads"]
    n_kv_heads = text["num_key_value_heads"]
    return [
        # Output-gated attention: per head [query(head_dim) || gate(head_dim)].
        _matrix(p + "q_proj.weight", 2 * n_heads * head_dim, hidden),
        _matrix(p + "k_proj.weight", n_kv_heads * head_dim, hidden),
        _matrix(p + "v_proj.weight", n_kv_heads * head_dim, hidden),
        _matrix(p + "o_proj.weight", hidden, n_heads * head_dim),
        _offset_norm(p + "q_norm.weight", head_dim),
        _offset_norm(p + "k_norm.weight", head_dim),
    ]


def _linear_attention_tensors(p: str, text: dict) -> list[_Tensor]:
    hidden = text["hidden_size"]
    n_k_heads = text["linear_num_key_heads"]
    n_v_heads = text["linear_num_value_heads"]
    key_dim = n_k_heads * text["linear_key_head_dim"]
    value_head_dim = text["linear_value_head_dim"]
    value_dim = n_v_heads * value_head_dim
    conv_channels = 2 * key_dim + value_dim
    return [
        _matrix(p + "in_proj_qkv.weight", conv_channels, hidden),
        _matrix(p + "in_proj_z.weight", value_dim, hidden),
        _matrix(p + "in_proj_b.weight", n_v_heads, hidden),
        _matrix(p + "in_proj_a.weight", n_v_heads, hidden),
        _matrix(p + "conv1d.weight", conv_channels, 1, text["linear_conv_kernel_dim"]),
        _Tensor(p + "A_log", (n_v_heads,), "F32", _log_uniform(1.0, 16.0)),
        _Tensor(p + "dt_bias", (n_v_heads,), "BF16", _normal(0.1)),
        # The gated RMSNorm inside the linear attention is a plain weight (x * w), so it sits
        # near 1, unlike every other norm of the model.
        _Tensor(p + "norm.weight", (value_head_dim,), "F32", _normal(_NORM_OFFSET_STD, mean=1.0)),
        _matrix(p + "out_proj.weight", hidden, value_dim),
    ]


def _decoder_layer_tensors(p: str, text: dict, layer_type: str, experts: str) -> list[_Tensor]:
    hidden = text["hidden_size"]
    if layer_type == "full_attention":
        mixer = _full_attention_tensors(p + "self_attn.", text)
    elif layer_type == "linear_attention":
        mixer = _linear_attention_tensors(p + "linear_attn.", text)
    else:
        raise ValueError(f"unknown layer type {layer_type!r}")
    return [
        _offset_norm(p + "input_layernorm.weight", hidden),
        *mixer,
        _offset_norm(p + "post_attention_layernorm.weight", hidden),
        *_ffn_tensors(p + "mlp.", text, experts),
    ]


def _text_tensors(prefix: str, text: dict, experts: str) -> list[_Tensor]:
    hidden = text["hidden_size"]
    layer_types = text["layer_types"]
    if len(layer_types) != text["num_hidden_layers"]:
        raise ValueError(
            f"layer_types has {len(layer_types)} entries, num_hidden_layers is {text['num_hidden_layers']}"
        )
    tensors = [_matrix(prefix + "embed_tokens.weight", text["vocab_size"], hidden)]
    for i, layer_type in enumerate(layer_types):
        tensors += _decoder_layer_tensors(f"{prefix}layers.{i}.", text, layer_type, experts)
    tensors.append(_offset_norm(prefix + "norm.weight", hidden))
    return tensors


def _mtp_tensors(text: dict, experts: str) -> list[_Tensor]:
    """The multi-token-prediction head: a fusion projection and one full-attention layer per MTP
    layer. It reuses the main embedding and output (mtp_use_dedicated_embeddings is false)."""
    hidden = text["hidden_size"]
    tensors = [
        _matrix("mtp.fc.weight", hidden, 2 * hidden),
        _offset_norm("mtp.pre_fc_norm_embedding.weight", hidden),
        _offset_norm("mtp.pre_fc_norm_hidden.weight", hidden),
    ]
    for i in range(text["mtp_num_hidden_layers"]):
        tensors += _decoder_layer_tensors(f"mtp.layers.{i}.", text, "full_attention", experts)
    tensors.append(_offset_norm("mtp.norm.weight", hidden))
    return tensors


def _vision_tensors(vision: dict) -> list[_Tensor]:
    """The vision tower of the config: patch embedding, `depth` blocks, merger (random weights)."""
    p = "model.visual."
    width = vision.get("hidden_size", 768)
    inter = vision.get("intermediate_size", 3072)
    patch = vision.get("patch_size", 16)
    merged = width * vision.get("spatial_merge_size", 2) ** 2
    out_hidden = vision.get("out_hidden_size", 1024)

    def bias(name: str, size: int) -> _Tensor:
        return _Tensor(name, (size,), "BF16", _normal(_MATRIX_STD))

    def layer_norm(name: str, size: int) -> list[_Tensor]:
        return [_Tensor(name + ".weight", (size,), "BF16", _normal(_MATRIX_STD, mean=1.0)), bias(name + ".bias", size)]

    def linear(name: str, rows: int, cols: int) -> list[_Tensor]:
        return [_matrix(name + ".weight", rows, cols), bias(name + ".bias", rows)]

    def block(b: str) -> list[_Tensor]:
        return [
            *layer_norm(b + "norm1", width),
            *linear(b + "attn.qkv", 3 * width, width),
            *linear(b + "attn.proj", width, width),
            *layer_norm(b + "norm2", width),
            *linear(b + "mlp.linear_fc1", inter, width),
            *linear(b + "mlp.linear_fc2", width, inter),
        ]

    return [
        _matrix(
            p + "patch_embed.proj.weight",
            width, vision.get("in_channels", 3), vision.get("temporal_patch_size", 2), patch, patch,
        ),
        bias(p + "patch_embed.proj.bias", width),
        _matrix(p + "pos_embed.weight", vision.get("num_position_embeddings", 2304), width),
        *(t for i in range(vision.get("depth", 1)) for t in block(f"{p}blocks.{i}.")),
        *layer_norm(p + "merger.norm", width),
        *linear(p + "merger.linear_fc1", merged, merged),
        *linear(p + "merger.linear_fc2", out_hidden, merged),
    ]


def _checkpoint_tensors(config: dict, experts: str, mtp_experts: str, mtp: bool, vision: bool) -> list[_Tensor]:
    text = _text_params(config)
    # The vision-language wrapper nests the text model under model.language_model; a text-only
    # checkpoint (flat config, *ForCausalLM) puts it directly under model.
    is_wrapper = "text_config" in config
    tensors = _text_tensors("model.language_model." if is_wrapper else "model.", text, experts)
    if not text.get("tie_word_embeddings", False):
        tensors.append(_matrix("lm_head.weight", text["vocab_size"], text["hidden_size"]))
    if mtp and text.get("mtp_num_hidden_layers", 0) > 0:
        tensors += _mtp_tensors(text, mtp_experts)
    if vision and is_wrapper:
        tensors += _vision_tensors(config.get("vision_config", {}))
    return tensors


def checkpoint_layout(config: dict, *, experts: str = "fused", mtp_experts: str | None = None, mtp: bool = True,
                      vision: bool = True) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor write_checkpoint would write, without data:
    what a release's headers hold, from its config alone."""
    tensors = _checkpoint_tensors(config, experts, mtp_experts or experts, mtp, vision)
    return [(t.name, t.dtype, t.shape) for t in tensors]


# --- the streaming safetensors writer -----------------------------------------------------------


class _ChunkWriter:
    """Generates tensor data chunk by chunk into reused buffers and writes it out."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.values = np.empty(_CHUNK_ELEMENTS, np.float32)
        self.scratch = np.empty(_CHUNK_ELEMENTS, np.uint32)
        self.bf16 = np.empty(_CHUNK_ELEMENTS, np.uint16)

    def write(self, f, tensor: _Tensor) -> None:
        remaining = tensor.numel
        while remaining:
            n = min(remaining, _CHUNK_ELEMENTS)
            values = self.values[:n]
            tensor.fill(self.rng, values)
            if tensor.dtype == "F32":
                f.write(values.data)
            else:
                f.write(self._to_bf16(values).data)
            remaining -= n

    def _to_bf16(self, values: np.ndarray) -> np.ndarray:
        """Rounds float32 to bfloat16 (nearest, ties to even) and returns the 16-bit patterns.
        Clobbers `values`. Inputs are finite, so NaN handling is not needed."""
        bits = values.view(np.uint32)
        carry = self.scratch[: len(values)]
        np.right_shift(bits, 16, out=carry)
        carry &= 1
        carry += 0x7FFF
        bits += carry
        bits >>= 16
        out = self.bf16[: len(values)]
        np.copyto(out, bits, casting="unsafe")
        return out


# Image normalization for the vision tower (Qwen3-VL's processors use mean = std = 0.5 per channel).
PREPROCESSOR_CONFIG = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16,
                       "temporal_patch_size": 2, "merge_size": 2}


def safetensors_header(tensors) -> bytes:
    """The length prefix and JSON header of a safetensors file holding `tensors`, (name, dtype,
    shape, nbytes) each, in that order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces so the data starts 8-byte aligned, as the reference implementation does.
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes


def shard_file_name(i: int, n: int) -> str:
    """Shard i (from 1) of n, as the sharded checkpoints here are named."""
    return f"model.safetensors-{i:05d}-of-{n:05d}.safetensors"


def write_shard_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_safetensors(path: Path, tensors: list[_Tensor], writer: _ChunkWriter) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_header((t.name, t.dtype, t.shape, t.nbytes) for t in tensors))
        for t in tensors:
            writer.write(f, t)


def _split_into_shards(tensors: list[_Tensor], shard_bytes: int) -> list[list[_Tensor]]:
    """Greedy, in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _generation_config(config: dict) -> dict:
    # As the releases ship it: sampling recommended, and generation stops on <|im_end|> as well as
    # <|endoftext|>.
    return {
        "bos_token_id": 248044,
        "do_sample": True,
        "eos_token_id": [248046, 248044],
        "pad_token_id": 248044,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "transformers_version": config.get("transformers_version", "4.57.0.dev0"),
    }


def write_checkpoint(
    out_dir: str | Path,
    config: dict,
    *,
    seed: int = 0,
    experts: str = "fused",
    mtp_experts: str | None = None,
    mtp: bool = True,
    vision: bool = True,
    shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Writes a random-weight checkpoint for `config` (a config.json dict) into `out_dir`.

    experts: MoE expert layout of the decoder layers, "fused" (the BF16 release:
        `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`) or "per_expert"
        (`mlp.experts.{j}.{gate,up,down}_proj.weight`).
    mtp_experts: the same for the MTP layer; defaults to `experts`. Releases are reported to mix
        fused main layers with a per-expert MTP layer, which a converter must handle too.
    mtp: write `mtp.*` (when config has mtp_num_hidden_layers > 0).
    vision: write the `model.visual.*` tower and its preprocessor_config.json (vision-language
        configs only).
    shard_bytes: maximum data bytes per shard. A checkpoint that fits is a single
        `model.safetensors`; otherwise `model.safetensors-0000i-of-0000n.safetensors` shards plus
        `model.safetensors.index.json`.

    Writes config.json and generation_config.json, no tokenizer files. Returns the directory.
    """
    mtp_experts = mtp_experts or experts
    for layout in (experts, mtp_experts):
        if layout not in ("fused", "per_expert"):
            raise ValueError(f"expert layout must be 'fused' or 'per_expert', not {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Shards of an earlier, differently sharded checkpoint would confuse any loader.
    for stale in out.glob("model.safetensors*"):
        stale.unlink()

    tensors = _checkpoint_tensors(config, experts, mtp_experts, mtp, vision)
    shards = _split_into_shards(tensors, shard_bytes)
    writer = _ChunkWriter(seed)
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", tensors, writer)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file_name = shard_file_name(i, len(shards))
            _write_safetensors(out / file_name, shard, writer)
            weight_map.update((t.name, file_name) for t in shard)
        write_shard_index(out, weight_map, sum(t.nbytes for t in tensors))

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if vision and "vision_config" in config:
        (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
    return out
