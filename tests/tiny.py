"""Tiny numpy-only checkpoints (random weights, release layout) for tests that need no transformers."""

import copy
import json
from pathlib import Path

from qwen35.demo import real_vocab

# config.json of the real releases (public copies; the small models' are reconstructed), kept in the
# repository so the tests run on a machine that has nothing but this checkout.
RELEASE_CONFIGS = Path(__file__).resolve().parent / "release_configs"
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]


def tiny_config(moe: bool = False, **text_overrides) -> dict:
    """The 0.8B release config shrunk: same structure (3 linear : 1 full, MTP, k≠v heads), 300 tokens."""
    base = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "tie_word_embeddings": not moe,
        "text_config": {
            "hidden_size": 64, "num_hidden_layers": 4,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "full_attention_interval": 4, "head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "vocab_size": 300,
            "mtp_num_hidden_layers": 1, "tie_word_embeddings": not moe,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                                "mrope_section": [3, 3, 2], "mrope_interleaved": True},
        },
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "in_channels": 3,
                          "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 64,
                          "num_position_embeddings": 64},
    }
    text = base["text_config"]
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    else:
        text["intermediate_size"] = 128
    text.update(text_overrides)
    base["vision_config"]["out_hidden_size"] = text["hidden_size"]  # the merger projects into the text width
    return copy.deepcopy(base)


QWEN35_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def byte_level_tokenizer(checkpoint_dir: Path) -> None:
    """A 256-byte BPE vocabulary + a couple of merges + ChatML tokens, in the release's file layout."""
    chars = real_vocab.byte_level_table()
    vocab = {chars[b]: b for b in range(256)}
    merges = [[chars[ord("h")], chars[ord("i")]], [chars[ord(" ")], chars[ord("t")]]]
    for i, (a, b) in enumerate(merges):
        vocab[a + b] = 256 + i
    added = [real_vocab.added_token(280 + i, t) for i, t in enumerate(ADDED_TOKENS)]
    tokenizer = real_vocab.tokenizer_json(vocab, merges, added, QWEN35_PATTERN)
    (checkpoint_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (checkpoint_dir / "tokenizer_config.json").write_text(json.dumps(real_vocab.tokenizer_config(added)))
    (checkpoint_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def rewrite_checkpoint(src: Path, dst: Path, transform, shard_bytes: int = 2 * 1024**3) -> Path:
    """Copy a checkpoint, passing every tensor through transform(name, raw array) → [(name, array)].

    Raw arrays are as Checkpoint reads them (BF16 as uint16 bits), so values survive exactly. The
    output is written a shard at a time (at most about `shard_bytes` of tensors held), so a 9B
    checkpoint is rewritten in a few GB of memory; one shard is a single `model.safetensors`.
    """
    import os
    import shutil

    from qwen35.convert.checkpoint import Checkpoint
    from qwen35.demo.synthetic import shard_file_name, write_shard_index

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors*"))
    shards: list[tuple[Path, list[str], int]] = []  # (file, its tensors, their bytes)
    pending: list[tuple[str, object]] = []

    def flush() -> None:
        path = dst / f"shard-{len(shards)}.partial"
        _write_safetensors(path, pending)
        shards.append((path, [name for name, _ in pending], sum(array.nbytes for _, array in pending)))
        pending.clear()

    with Checkpoint(src) as ckpt:
        for name, info in ckpt.tensors.items():
            pending += transform(name, ckpt.read_rows(name, 0, info.rows).reshape(info.shape))
            if sum(array.nbytes for _, array in pending) >= shard_bytes:
                flush()
    if pending or not shards:
        flush()
    if len(shards) == 1:
        os.replace(shards[0][0], dst / "model.safetensors")
        return dst
    weight_map = {}
    for i, (path, names, _) in enumerate(shards, 1):
        file_name = shard_file_name(i, len(shards))
        os.replace(path, dst / file_name)
        weight_map.update((name, file_name) for name in names)
    write_shard_index(dst, weight_map, sum(nbytes for *_, nbytes in shards))
    return dst


def _write_safetensors(path: Path, tensors) -> None:
    import numpy as np

    from qwen35.demo.synthetic import safetensors_header

    dtypes = {np.dtype("<u2"): "BF16", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}
    with open(path, "wb") as f:
        f.write(safetensors_header((name, dtypes[a.dtype], a.shape, a.nbytes) for name, a in tensors))
        for _, array in tensors:
            f.write(memoryview(np.ascontiguousarray(array)).cast("B"))  # no copy of a GB-sized tensor


def split_fused_experts(name, raw):
    """Fused `mlp.experts.gate_up_proj` / `down_proj` → per-expert `mlp.experts.{j}.*_proj.weight`."""
    if name.endswith("mlp.experts.gate_up_proj"):
        prefix, half = name[: -len("gate_up_proj")], raw.shape[1] // 2
        return [(f"{prefix}{j}.{part}_proj.weight", raw[j, s]) for j in range(raw.shape[0])
                for part, s in (("gate", slice(0, half)), ("up", slice(half, None)))]
    if name.endswith("mlp.experts.down_proj"):
        prefix = name[: -len("down_proj")]
        return [(f"{prefix}{j}.down_proj.weight", raw[j]) for j in range(raw.shape[0])]
    return [(name, raw)]


def gguf_contents(path):
    """(metadata, {tensor name: (shape, ggml type, raw bytes)}) of a GGUF file."""
    from qwen35.gguf_header import read_header

    header = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for t in header.tensors:
            f.seek(t.offset)
            out[t.name] = (t.shape, t.ggml_type, f.read(t.nbytes))
    return header.metadata, out
