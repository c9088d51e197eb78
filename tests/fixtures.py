"""Tiny Qwen3.5 checkpoints in the real release layout, with transformers' float32 reference logits.

transformers builds and saves each model; the saved tensors are then rewritten the way the Hugging
Face releases store them (their safetensors index files):

- keys `model.language_model.*`, `model.visual.*` (vision tower present), `lm_head.weight` only when
  untied, and `mtp.*`: transformers has no MTP module, so a random MTP layer with the release's
  names and shapes is added;
- BF16 everywhere except F32 `linear_attn.A_log` and `linear_attn.norm.weight`;
- MoE experts either fused (`mlp.experts.gate_up_proj` [E, 2*Fe, H], `mlp.experts.down_proj`
  [E, H, Fe], no `.weight` suffix; the MTP layer stays per-expert, as in the BF16 release) or
  per-expert (`mlp.experts.{j}.{gate,up,down}_proj.weight`);
- sharded `model.safetensors-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, or a
  single `model.safetensors`.

The reference logits are computed by loading the finished checkpoint back with transformers in
float32, so they see exactly the BF16-rounded weights a converter reads.

Weights are random but not at init scale: matrices are scaled by 1/sqrt(fan_in) (the projections
into the residual stream by less, see `_residual_scale`), norm weights are spread around their
neutral value and A_log / dt_bias differ per head, so every layer and head moves the output and
the final distribution is peaked (logit std ~3). A converter bug (a missing +1, unreordered V
heads, wrong rope) then moves the KL divergence by orders of magnitude instead of hiding in a
near-uniform softmax.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen35.demo import real_vocab
from qwen35.demo.synthetic import PREPROCESSOR_CONFIG

__all__ = ["FIXTURES", "BuiltFixture", "FixtureSpec", "build_fixture", "cached_fixture"]

HIDDEN = 64
HEAD_DIM = 64  # partial_rotary_factor 0.25 -> rotary dim 16 -> mrope sections [3, 3, 2] (sum * 2 == 16)
MROPE_SECTION = [3, 3, 2]
LINEAR_HEAD_DIM = 16  # key and value head dims must match: llama.cpp's ssm inner size is state_size * Lv
NUM_LAYERS = 8  # two groups of 3 linear-attention layers + 1 full-attention layer
VOCAB_SIZE = 512  # config/embedding rows; the tokenizer has fewer tokens, the rest is padding
PROMPT_LENGTH = 40

# Byte-level words whose left-to-right merges make up the tiny BPE vocabulary ("Ġ" is a space).
_WORDS = [
    "Ġthe", "Ġand", "Ġto", "Ġof", "Ġin", "Ġis", "Ġyou", "Ġthat", "Ġit", "Ġfor", "ing", "er", "ed",
    "Ġhello", "Ġworld", "ĠQwen", "Ġmodel", "Ġtoken", "Ġassistant", "Ġuser", "ĊĊ", "ĠĠ", "ĠĠĠĠ",
]
# ChatML specials plus the plain added tokens the chat template emits, after the BPE tokens.
_ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>",
                 "</tool_response>", "<think>", "</think>"]


@dataclass(frozen=True)
class FixtureSpec:
    name: str
    moe: bool
    tied: bool
    mtp: bool
    linear_key_heads: int
    linear_value_heads: int
    shards: int = 1
    fused_experts: bool = False


FIXTURES = {
    spec.name: spec
    for spec in (
        FixtureSpec("dense_untied_kv_ne", moe=False, tied=False, mtp=True,
                    linear_key_heads=2, linear_value_heads=4, shards=3),
        FixtureSpec("dense_tied_no_mtp", moe=False, tied=True, mtp=False,
                    linear_key_heads=2, linear_value_heads=2),
        FixtureSpec("dense_ratio3", moe=False, tied=False, mtp=True,
                    linear_key_heads=2, linear_value_heads=6),
        FixtureSpec("moe_fused", moe=True, tied=False, mtp=True,
                    linear_key_heads=2, linear_value_heads=4, shards=2, fused_experts=True),
        FixtureSpec("moe_per_expert", moe=True, tied=False, mtp=True,
                    linear_key_heads=2, linear_value_heads=4),
    )
}


@dataclass(frozen=True)
class BuiltFixture:
    """A built checkpoint and, beside it, the prompt and transformers' float32 logits for it."""

    spec: FixtureSpec
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def prompt_ids(self) -> list[int]:
        return np.load(self.root / "prompt_ids.npy").tolist()

    @property
    def reference_logits(self) -> np.ndarray:
        """[PROMPT_LENGTH, VOCAB_SIZE] float32 logits of transformers for `prompt_ids`."""
        return np.load(self.root / "reference_logits.npy")


def cached_fixture(spec: FixtureSpec, cache_root: Path) -> BuiltFixture:
    """The fixture under `cache_root/<key>/<name>`, built first if absent.

    The key (_builder_key) hashes this file, the modules it writes files with, and the versions of
    torch, transformers and the writers, so editing a builder or upgrading the reference
    implementation rebuilds; a build lands by an atomic rename.
    """
    root = Path(cache_root) / _builder_key() / spec.name
    build_once(root, lambda staging: build_fixture(spec, staging))
    return BuiltFixture(spec, root)


def build_once(root: Path, build) -> None:
    """`build(staging_dir)` into a fresh folder beside `root`, landed at `root` by an atomic rename;
    nothing to do when `root` already holds a finished build (its reference_logits.npy)."""
    if (root / "reference_logits.npy").is_file():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        build(staging)
        try:
            os.replace(staging, root)
        except OSError:
            # Another test process landed the same build first.
            if not (root / "reference_logits.npy").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _builder_key(*extra_modules) -> str:
    """This file, the modules that write the checkpoint's files besides it (wherever they live),
    and the versions of the packages that build and save it (tests.cache_key)."""
    from qwen35.demo.synthetic import write_shard_index

    from tests.cache_key import fixture_key

    return fixture_key(modules=[__name__, real_vocab.__name__, inspect.getmodule(write_shard_index).__name__,
                                *extra_modules], converter=False,
                       distributions=("torch", "transformers", "safetensors", "numpy", "tokenizers"))


def build_fixture(spec: FixtureSpec, root: Path) -> BuiltFixture:
    """Write `root/checkpoint/` (release layout), `root/prompt_ids.npy`, `root/reference_logits.npy`."""
    import torch

    root = Path(root)
    checkpoint = root / "checkpoint"
    saved = root / "saved_by_transformers"
    checkpoint.mkdir(parents=True)
    seed = int.from_bytes(hashlib.sha256(spec.name.encode()).digest()[:4], "little")

    config = _release_config(spec)
    _write_json(checkpoint / "config.json", config)
    _write_json(checkpoint / "generation_config.json", _generation_config())
    n_tokens = _write_tiny_tokenizer(checkpoint)
    _write_chat_template(checkpoint)
    _write_json(checkpoint / "preprocessor_config.json", PREPROCESSOR_CONFIG)

    model_class = _model_class(spec)
    torch.manual_seed(seed)  # transformers' own init, kept for the vision tower
    # The config says bfloat16; build in float32 so that the F32 tensors of the release
    # (A_log, linear_attn.norm) keep full precision and BF16 rounding happens once, on writing.
    model = model_class(model_class.config_class.from_pretrained(checkpoint)).float()
    _randomize(model, torch.Generator().manual_seed(seed), _residual_scale(spec))
    model.save_pretrained(saved)
    tensors = _release_tensors(spec, _read_saved(saved), torch.Generator().manual_seed(seed + 1))
    _write_safetensors(checkpoint, tensors, spec.shards)
    shutil.rmtree(saved)

    prompt = np.random.default_rng(seed).integers(0, n_tokens, PROMPT_LENGTH)
    np.save(root / "prompt_ids.npy", prompt.astype(np.int64))
    np.save(root / "reference_logits.npy", _reference_logits(model_class, checkpoint, prompt))
    return BuiltFixture(spec, root)


def _model_class(spec: FixtureSpec):
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration if spec.moe else Qwen3_5ForConditionalGeneration


# --- config files ---------------------------------------------------------------------------


def _release_config(spec: FixtureSpec) -> dict:
    """config.json shaped like the releases (text_config nested, rope inside rope_parameters)."""
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "dtype": "bfloat16",
        "eos_token_id": _token_id("<|endoftext|>"),
        "full_attention_interval": 4,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(NUM_LAYERS)],
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": LINEAR_HEAD_DIM,
        "linear_num_key_heads": spec.linear_key_heads,
        "linear_num_value_heads": spec.linear_value_heads,
        "linear_value_head_dim": LINEAR_HEAD_DIM,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "model_type": "qwen3_5_moe_text" if spec.moe else "qwen3_5_text",
        "mtp_num_hidden_layers": 1 if spec.mtp else 0,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": 2,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
        "mamba_ssm_dtype": "float32",
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": MROPE_SECTION,
            "rope_type": "default",
            "rope_theta": 10000000,
            "partial_rotary_factor": 0.25,
        },
    }
    if spec.moe:
        del text["intermediate_size"]
        text.update({
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.001,
            "shared_expert_intermediate_size": 48,
        })
    if not spec.tied:
        # The tied fixture keeps the flag at the root only, which releases allow.
        text["tie_word_embeddings"] = False
    model_type = "qwen3_5_moe" if spec.moe else "qwen3_5"
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if spec.moe else "Qwen3_5ForConditionalGeneration"],
        "image_token_id": 248056,
        "model_type": model_type,
        "text_config": text,
        "tie_word_embeddings": spec.tied,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": 248057,
        "vision_config": {
            "deepstack_visual_indexes": [],
            "depth": 1,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 32,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": 64,
            "model_type": model_type,
            "num_heads": 2,
            "num_position_embeddings": 16,
            "out_hidden_size": HIDDEN,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": 248054,
        "vision_start_token_id": 248053,
    }


def _generation_config() -> dict:
    return {
        "bos_token_id": _token_id("<|endoftext|>"),
        "do_sample": True,
        "eos_token_id": [_token_id("<|im_end|>"), _token_id("<|endoftext|>")],
        "pad_token_id": _token_id("<|endoftext|>"),
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "transformers_version": "4.57.0.dev0",
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_chat_template(checkpoint: Path) -> None:
    from qwen35.demo.real_vocab import write_chat_template

    write_chat_template(checkpoint)


# --- tiny byte-level BPE tokenizer ----------------------------------------------------------


def _byte_tokens() -> list[str]:
    """The 256 byte-level symbols in GPT-2 order (printable bytes first), as tiktoken ranks them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _bpe_vocab_and_merges() -> tuple[dict[str, int], list[list[str]]]:
    vocab = {token: i for i, token in enumerate(_byte_tokens())}
    merges = []
    for word in _WORDS:
        left = word[0]
        for char in word[1:]:
            merged = left + char
            if merged not in vocab:
                merges.append([left, char])
                vocab[merged] = len(vocab)
            left = merged
    return vocab, merges


def _token_id(content: str) -> int:
    n_bpe = len(_bpe_vocab_and_merges()[0])
    return n_bpe + _ADDED_TOKENS.index(content)


def _write_tiny_tokenizer(checkpoint: Path) -> int:
    """tokenizer.json + tokenizer_config.json; returns the number of real (non-padding) tokens."""
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    vocab, merges = _bpe_vocab_and_merges()
    added = [real_vocab.added_token(_token_id(content), content) for content in _ADDED_TOKENS]
    _write_json(checkpoint / "tokenizer.json", real_vocab.tokenizer_json(vocab, merges, added, PRETOKENIZE_REGEX))
    _write_json(checkpoint / "tokenizer_config.json", real_vocab.tokenizer_config(added))
    return len(vocab) + len(added)


# --- weights --------------------------------------------------------------------------------


def _random_value(name: str, shape: tuple[int, ...], generator, residual_scale: float):
    """A random tensor for parameter `name`, at a scale where it visibly shapes the output."""
    import torch

    def normal(std: float):
        return torch.randn(shape, generator=generator) * std

    def uniform(low: float, high: float):
        return torch.rand(shape, generator=generator) * (high - low) + low

    if name.endswith("A_log"):
        return uniform(1.0, 8.0).log()
    if name.endswith("dt_bias"):
        return uniform(-1.0, 1.0)
    if name.endswith("linear_attn.norm.weight"):
        return 1.0 + normal(0.2)  # a plain weight: the gated norm computes x̂ * w
    if name.endswith("norm.weight"):
        return normal(0.2)  # an offset: Qwen3.5 RMSNorm computes x̂ * (1 + w)
    if name.endswith("conv1d.weight"):
        return normal(1.0 / math.sqrt(shape[-1]))
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return normal(3.0 / math.sqrt(HIDDEN))  # logit std ~3 through either head
    if name.endswith("mlp.gate.weight"):
        return normal(2.0 / math.sqrt(HIDDEN))  # a decisive router keeps top-k away from ties
    if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")):
        return normal(residual_scale / math.sqrt(shape[-1]))
    # Every other text weight is a matrix [..., out, in] (fused experts carry a leading E).
    return normal(1.0 / math.sqrt(shape[-1]))


def _residual_scale(spec: FixtureSpec) -> float:
    """Gain of the projections that write into the residual stream.

    At unit gain a random 8-layer net is chaotic: BF16 rounding of activations alone costs a KL
    of ~0.1, which would drown the BF16/F16/Q8_0 comparison. Small residual updates keep that at
    ~1e-4 while a converter bug still costs 1e-3 to 1. With tied embeddings the updates must be
    larger, or the final state stays so close to the input token's own embedding row that the
    model only echoes its input and hides bugs in the layers.
    """
    return 0.3 if spec.tied else 0.12


def _randomize(model, generator, residual_scale: float) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # The vision tower keeps transformers' init: the text forward never reads it.
            if ".visual." not in f".{name}":
                parameter.copy_(_random_value(name, tuple(parameter.shape), generator, residual_scale))


def _read_saved(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _release_tensors(spec: FixtureSpec, saved: dict, generator) -> dict:
    """transformers' saved tensors with the release's expert layout and dtypes, plus MTP.

    save_pretrained already writes the release's names (and no lm_head when tied) but per-expert
    MoE tensors, whatever the model holds in memory (fused).
    """
    import torch

    tensors = _fuse_experts(saved)
    if not spec.fused_experts:
        tensors = _split_experts(tensors)
    if spec.mtp:
        tensors.update(_mtp_tensors(tensors, generator, _residual_scale(spec)))
    f32 = ("linear_attn.A_log", "linear_attn.norm.weight")
    return {
        name: value.to(torch.float32 if name.endswith(f32) else torch.bfloat16).contiguous()
        for name, value in sorted(tensors.items())
    }


_PER_EXPERT = re.compile(r"((?:.*\.)?mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
_FUSED = re.compile(r"((?:.*\.)?mlp\.experts)\.(gate_up_proj|down_proj)")


def _fuse_experts(tensors: dict) -> dict:
    """Per-expert `experts.{j}.{gate,up,down}_proj.weight` stacked into `gate_up_proj` / `down_proj`."""
    import torch

    fused, experts = {}, {}
    for name, value in tensors.items():
        if match := _PER_EXPERT.fullmatch(name):
            prefix, j, kind = match.groups()
            experts.setdefault(prefix, {}).setdefault(int(j), {})[kind] = value
        else:
            fused[name] = value
    for prefix, by_index in experts.items():
        ordered = [by_index[j] for j in range(len(by_index))]
        fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([e["gate"], e["up"]]) for e in ordered])
        fused[f"{prefix}.down_proj"] = torch.stack([e["down"] for e in ordered])
    return fused


def _split_experts(tensors: dict) -> dict:
    """Fused `gate_up_proj` [E, 2*Fe, H] / `down_proj` [E, H, Fe] as per-expert `.weight` tensors."""
    split = {}
    for name, value in tensors.items():
        match = _FUSED.fullmatch(name)
        if match is None:
            split[name] = value
            continue
        prefix, kind = match.groups()
        for j, expert in enumerate(value):
            if kind == "down_proj":
                split[f"{prefix}.{j}.down_proj.weight"] = expert
            else:
                gate, up = expert.chunk(2, dim=0)  # gate is the first Fe rows
                split[f"{prefix}.{j}.gate_proj.weight"] = gate
                split[f"{prefix}.{j}.up_proj.weight"] = up
    return split


def _mtp_tensors(tensors: dict, generator, residual_scale: float) -> dict:
    """The release's MTP block: fc [H, 2H], three norms and one full-attention decoder layer.

    Its layer has the shapes of the model's first full-attention layer (index 3); MoE experts are
    per-expert there even in the fused BF16 release.
    """
    template = "model.language_model.layers.3."
    layer = _split_experts({k[len(template):]: v for k, v in tensors.items() if k.startswith(template)})
    shapes = {"fc.weight": (HIDDEN, 2 * HIDDEN)}
    shapes.update({f"{norm}.weight": (HIDDEN,) for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")})
    shapes.update({f"layers.0.{name}": tuple(value.shape) for name, value in layer.items()})
    return {
        f"mtp.{name}": _random_value(f"mtp.{name}", shape, generator, residual_scale)
        for name, shape in shapes.items()
    }


def _write_safetensors(checkpoint: Path, tensors: dict, shards: int) -> None:
    from safetensors.torch import save_file

    from qwen35.demo.synthetic import shard_file_name, write_shard_index

    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, checkpoint / "model.safetensors", metadata=metadata)
        return
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        shard_name = shard_file_name(i + 1, shards)
        shard = {name: tensors[name] for name in names[i::shards]}
        save_file(shard, checkpoint / shard_name, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, shard_name))
    write_shard_index(checkpoint, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))


def _reference_logits(model_class, checkpoint: Path, prompt: np.ndarray) -> np.ndarray:
    """transformers' float32 logits, from the checkpoint as written (BF16-rounded weights)."""
    import torch

    model, info = model_class.from_pretrained(checkpoint, dtype=torch.float32, output_loading_info=True)
    # A key the loader did not find would be silently re-initialised: refuse that.
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
    if info["missing_keys"] or unexpected or info["mismatched_keys"]:
        raise AssertionError(f"checkpoint does not load cleanly: {info}")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(prompt[None, :], dtype=torch.long)).logits[0]
    return logits.to(torch.float32).numpy()
