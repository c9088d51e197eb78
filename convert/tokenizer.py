"""Tokenizer, chat template and recommended sampling, as GGUF metadata.

Qwen3.5 is byte-level BPE (llama.cpp's `gpt2` model) with its own pre-tokenizer, `qwen35`, whose
regex adds \\p{M} to the letter classes. llama.cpp recognises that pre-tokenizer by a vocabulary hash
only for the exact release vocabulary, so it is set here from the tokenizer's own regex instead.
Facts read from the pinned sdist's src/llama-vocab.cpp (the qwen35 pre-tokenizer).
"""

from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import read_json
from .errors import ConvertError

# gguf's TokenType values (llama.cpp's llama_token_type).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_CONTROL_LOOK = re.compile(r"^<\|.*\|>$")


def _vocab_and_merges(checkpoint_dir: Path) -> tuple[dict[str, int], list[str], list[dict], str | None]:
    """(vocab, merges, added tokens, pre-tokenizer regex) from tokenizer.json or vocab.json + merges.txt."""
    tokenizer_json = checkpoint_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        data = read_json(tokenizer_json)
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ConvertError(f"{tokenizer_json}: model type {model.get('type')!r}; Qwen3.5 uses byte-level BPE")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return model.get("vocab", {}), merges, data.get("added_tokens", []), _split_regex(data.get("pre_tokenizer"))
    vocab_json, merges_txt = checkpoint_dir / "vocab.json", checkpoint_dir / "merges.txt"
    if vocab_json.is_file() and merges_txt.is_file():
        lines = merges_txt.read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
        config = read_json(checkpoint_dir / "tokenizer_config.json")
        added = [
            {"id": int(i), "content": t.get("content"), "special": t.get("special", False)}
            for i, t in (config.get("added_tokens_decoder") or {}).items()
        ]
        return read_json(vocab_json), merges, added, None
    raise ConvertError(f"no tokenizer in {checkpoint_dir}: expected tokenizer.json, or vocab.json and merges.txt")


def _split_regex(pre_tokenizer: dict | None) -> str | None:
    if not pre_tokenizer:
        return None
    parts = pre_tokenizer.get("pretokenizers") or [pre_tokenizer]
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern") or {}
            return pattern.get("Regex") or pattern.get("String")
    return None


def _pre_tokenizer(regex: str | None) -> str:
    # Qwen2/3's regex lacks \p{M}; Qwen3.5's has it. Without a regex (vocab.json layout) assume Qwen3.5.
    if regex is not None and r"\p{M}" not in regex:
        return "qwen2"
    return "qwen35"


def _token_id(name: str | dict | None, ids: dict[str, int]) -> int | None:
    if isinstance(name, dict):
        name = name.get("content")
    return ids.get(name) if name is not None else None


def tokenizer_metadata(checkpoint_dir: Path, n_vocab: int) -> list[tuple[str, str, object]]:
    """Every tokenizer key, with the token list padded to the embedding's row count."""
    vocab, merges, added, regex = _vocab_and_merges(checkpoint_dir)
    tokens: list[str | None] = [None] * n_vocab
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        if i >= n_vocab:
            raise ConvertError(f"token {text!r} has id {i}, past the embedding's {n_vocab} rows")
        tokens[i], types[i] = text, NORMAL
    for t in added:
        i, text = int(t["id"]), t["content"]
        if i >= n_vocab:
            raise ConvertError(f"added token {text!r} has id {i}, past the embedding's {n_vocab} rows")
        tokens[i] = text
        types[i] = CONTROL if t.get("special") or _CONTROL_LOOK.match(text) else USER_DEFINED
    # The embedding has more rows than the tokenizer has tokens; llama.cpp needs one token per row.
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    ids = {t: i for i, t in enumerate(tokens)}

    config = read_json(checkpoint_dir / "tokenizer_config.json")
    kv = [
        ("tokenizer.ggml.model", "string", "gpt2"),
        ("tokenizer.ggml.pre", "string", _pre_tokenizer(regex)),
        ("tokenizer.ggml.tokens", "string[]", tokens),
        ("tokenizer.ggml.token_type", "i32[]", types),
        ("tokenizer.ggml.merges", "string[]", merges),
    ]
    eos = _token_id(config.get("eos_token"), ids)
    if eos is None:
        eos = ids.get("<|im_end|>")
    pad = _token_id(config.get("pad_token"), ids)
    bos = _token_id(config.get("bos_token"), ids)
    for key, value in (("eos", eos), ("padding", pad), ("bos", bos)):
        if value is not None:
            kv.append((f"tokenizer.ggml.{key}_token_id", "u32", value))
    kv.append(("tokenizer.ggml.add_bos_token", "bool", bool(config.get("add_bos_token", False))))
    kv.append(("tokenizer.ggml.add_eos_token", "bool", bool(config.get("add_eos_token", False))))

    template = chat_template(checkpoint_dir, config)
    if template:
        kv.append(("tokenizer.chat_template", "string", template))
    return kv


def chat_template(checkpoint_dir: Path, tokenizer_config: dict) -> str | None:
    path = checkpoint_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


def sampling_metadata(checkpoint_dir: Path) -> list[tuple[str, str, object]]:
    """The release's recommended sampling, where llama.cpp has a general.sampling key for it."""
    config = read_json(checkpoint_dir / "generation_config.json")
    keys = (("temperature", "general.sampling.temp", "f32"), ("top_k", "general.sampling.top_k", "i32"),
            ("top_p", "general.sampling.top_p", "f32"), ("min_p", "general.sampling.min_p", "f32"),
            ("repetition_penalty", "general.sampling.penalty_repeat", "f32"))
    kv = []
    for hf_key, gguf_key, kind in keys:
        value = config.get(hf_key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kv.append((gguf_key, kind, value))
    return kv


def license_of(checkpoint_dir: Path) -> str | None:
    """`license:` from the model card's front matter, as Hugging Face model cards carry it."""
    card = checkpoint_dir / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if not match:
        return None
    found = re.search(r"^license:\s*(\S+)\s*$", match.group(1), re.M)
    return found.group(1).strip("'\"") if found else None
