"""GGUFs whose next token is known: `<tool_call>` whatever the context (a model that always wants to
call a tool), or `</think>` after any token but one (a model that reasons for a token, then answers).

The demo model's structure (real 248k vocabulary and chat template, untied output), rewritten from
random weights (tests.tiny.rewrite_checkpoint) so that its choice is known:
- every projection into the residual stream is zero and the final norm neutral, so the final hidden
  state is the normalized embedding of the current token (as in tests/mtp_fixtures.py);
- every embedding row gets the same large first component (1.0, against random values ~0.02), so
  that state's first component is ~+11 for every token;
- the output row of `<tool_call>` reads only that component (2.0 there, 0 elsewhere): its logit is
  ~+22 after any token, while every other row stays random (logits within about ±1.5).
So greedy decoding writes `<tool_call>` at every step, unless a sampler bans it; banned, the model
writes the random rows' noise. With `unless_after`, that token's embedding gets -1.0 instead: after
it the favoured token's logit is ~-22, and the model writes noise. Several favoured tokens are
favoured in their order (rows 2.0, 1.0, 0.5, …): the second is written where the first may not be.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from tests.mtp_fixtures import _NEUTRAL_NORMS, _ZEROED, _cache_root, _from_bf16, _to_bf16, variant_config

CALL = "<tool_call>"


def token_id(checkpoint: Path, text: str) -> int:
    """The id of an added token (`<tool_call>`), or of a byte-level one ("\n" is "Ċ")."""
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    return added[text] if text in added else tokenizer["model"]["vocab"][text.replace("\n", "Ċ").replace(" ", "Ġ")]


def favour_token(tokens: list[int], unless_after: int | None = None):
    """The rewrite (for tests.tiny.rewrite_checkpoint) described in the module docstring."""

    def transform(name: str, raw: np.ndarray):
        if name.endswith("embed_tokens.weight"):
            values = _from_bf16(raw)
            values[:, 0] = 1.0
            if unless_after is not None:
                values[unless_after, 0] = -1.0
            return [(name, _to_bf16(values))]
        if name == "lm_head.weight":
            out = raw.copy()
            for i, token in enumerate(tokens):
                out[token] = 0
                out[token, 0] = _to_bf16(np.float32([2.0 / 2**i]))[0]
            return [(name, out)]
        if name.endswith(_ZEROED) or name.endswith(_NEUTRAL_NORMS):
            return [(name, np.zeros_like(raw))]  # 0 is also a norm offset of 0: weight 1
        return [(name, raw)]

    return transform


def favouring_key(favoured: tuple[str, ...], unless_after: str | None, qtype: str) -> str:
    from qwen35.demo.real_vocab import write_tokenizer_files
    from qwen35.demo.synthetic import write_checkpoint

    from tests import mtp_fixtures, tiny
    from tests.cache_key import fixture_key

    return fixture_key(modules=[inspect.getmodule(f) for f in (write_checkpoint, write_tokenizer_files)]
                       + [__name__, tiny.__name__, mtp_fixtures.__name__],
                       data=["favouring", favoured, unless_after, variant_config(tied=False), qtype])


def build_call_favouring_gguf(qtype: str = "q8_0") -> Path:
    """The model whose next token is always `<tool_call>`."""
    return build_favouring_gguf(CALL, qtype=qtype)


def build_favouring_gguf(*favoured: str, unless_after: str | None = None, qtype: str = "q8_0") -> Path:
    """The GGUF that favours the tokens `favoured` (cached under the test cache by favouring_key)."""
    from qwen35.convert import convert
    from qwen35.demo.real_vocab import write_chat_template, write_tokenizer_files
    from qwen35.demo.synthetic import write_checkpoint

    from tests.tiny import rewrite_checkpoint

    key = favouring_key(favoured, unless_after, qtype)
    target = _cache_root() / f"favouring-{key}" / f"favouring-{qtype.upper()}.gguf"
    if target.is_file():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        ckpt = write_checkpoint(Path(tmp) / "random", variant_config(tied=False), vision=False)
        write_tokenizer_files(ckpt)
        write_chat_template(ckpt)
        after = None if unless_after is None else token_id(ckpt, unless_after)
        ckpt = rewrite_checkpoint(ckpt, Path(tmp) / "favouring", favour_token([token_id(ckpt, t) for t in favoured], after))
        convert(ckpt, [qtype], Path(tmp) / target.name, force=True)
        target.parent.mkdir(exist_ok=True)
        os.replace(Path(tmp) / target.name, target)
    return target
