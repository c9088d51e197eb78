"""GGUFs for speculative decoding: the demo model's structure (real 248k vocabulary and template)
in dense/MoE and tied/untied variants, and models whose MTP head agrees with them at a known rate.

Random weights accept almost no draft, so `acceptance_transform` rewrites a random checkpoint into
one whose behaviour is known while its compute per token is not changed (zeros cost as much as
any other value):
- every projection into the residual stream (attention and linear-attention outputs, FFN and
  expert down projections) is zero, so the final hidden state is the normalized embedding of the
  current token;
- the untied output maps that embedding to a fixed successor: row succ(t) is t's unit embedding,
  where succ walks all regular tokens in one random cycle (rows of control tokens are zero, so
  they never win), and the target's greedy reply follows the cycle; with `span`, the cycle walks
  only the first `span` regular ids (the most frequent, as a model of real text mostly predicts
  them: what a reduced-vocabulary draft, draft_head.py, is made for), every other row is zero, and
  a reply enters the cycle at its first token;
- the MTP block passes the embedding of the token it is given through to the shared output (its
  fusion projection is [I + σG, 0], its layer's outputs are zero), so it predicts the same
  successor; with σ = 0 every draft is right, and σ is chosen (by bisection over a sample of
  tokens, in float32) so that a fraction `rate` of tokens is still predicted right.

Each GGUF is cached under the test cache, keyed (tests.cache_key) by everything that shapes it: the
converter, the profiles, the checkpoint builders, this file and tests/tiny.py, the packages that
write bytes, and the variant.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_REGULAR = 248044  # tokens below the first control token (<|endoftext|>) in Qwen3.5's vocabulary


def _cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen35" / "test-fixtures"
    return Path(os.environ.get("QWEN35_TEST_CACHE", default))


def variant_config(*, moe: bool = False, tied: bool = True, text: dict | None = None) -> dict:
    """The demo config (Qwen3.5-0.8B's structure at hidden 128), optionally MoE and/or untied."""
    from qwen35.demo.random_checkpoint import demo_config

    config = demo_config()
    t = config["text_config"]
    if moe:
        del t["intermediate_size"]
        t.update(model_type="qwen3_5_moe_text", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                 shared_expert_intermediate_size=64)
        config.update(model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"])
    t["tie_word_embeddings"] = config["tie_word_embeddings"] = tied
    t.update(text or {})
    return config


def gguf_key(config: dict, qtype: str, *, acceptance: float | None = None, seed: int = 0,
             vision: bool = False, span: int | None = None) -> str:
    """build_gguf's cache key (tests.cache_key): the converter, the modules that write the
    checkpoint (wherever they live), this file, tests/tiny.py, and the variant."""
    from qwen35.demo.real_vocab import write_tokenizer_files
    from qwen35.demo.synthetic import write_checkpoint

    from . import tiny
    from .cache_key import fixture_key

    return fixture_key(modules=[inspect.getmodule(f) for f in (write_checkpoint, write_tokenizer_files)]
                       + [__name__, tiny.__name__],
                       data=[config, acceptance, seed, qtype] + ([True] if vision else []) + ([span] if span else []))


def build_gguf(config: dict, qtype: str, *, acceptance: float | None = None, seed: int = 0,
               vision: bool = False, span: int | None = None) -> Path:
    """`config` converted to `qtype`; with `acceptance`, rewritten first by acceptance_transform
    (its successors within the first `span` ids, if given); with `vision`, with a random vision
    tower, whose mmproj is written beside it."""
    from qwen35.convert import convert
    from qwen35.demo.real_vocab import write_chat_template, write_tokenizer_files
    from qwen35.demo.synthetic import write_checkpoint

    from .tiny import rewrite_checkpoint

    key = gguf_key(config, qtype, acceptance=acceptance, seed=seed, vision=vision, **({"span": span} if span else {}))
    name = f"mtp-{'acc' + str(acceptance) if acceptance is not None else 'random'}-{qtype.upper()}.gguf"
    target = _cache_root() / f"mtp-{key}" / name
    if target.is_file():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        ckpt = write_checkpoint(Path(tmp) / "random", config, seed=seed, vision=vision)
        write_tokenizer_files(ckpt)
        write_chat_template(ckpt)
        if acceptance is not None:
            ckpt = rewrite_checkpoint(ckpt, Path(tmp) / "controlled", acceptance_transform(ckpt, acceptance, seed, span))
        outputs = convert(ckpt, [qtype], Path(tmp) / name, force=True, mmproj="f16" if vision else None)
        target.parent.mkdir(exist_ok=True)
        for output in outputs:  # the text GGUF last: it is what says the build is complete
            if output.path.name != name:
                os.replace(output.path, target.parent / output.path.name)
        os.replace(Path(tmp) / name, target)
    return target


# --- controlled acceptance ----------------------------------------------------------------------


def _from_bf16(raw: np.ndarray) -> np.ndarray:
    bits = raw.astype(np.uint32)
    bits <<= 16  # in place: a 9B embedding is 4 GB in float32
    return bits.view(np.float32)


def _to_bf16(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


_ZEROED = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")
_NEUTRAL_NORMS = ("language_model.norm.weight", "mtp.pre_fc_norm_embedding.weight",
                  "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight")


def successor_cycle(seed: int, span: int | None = None) -> np.ndarray:
    """succ[t] for every regular token: one random cycle through all of them (through the first
    `span` of them; -1 for the others, which are no token's successor)."""
    n = span or N_REGULAR
    order = np.random.default_rng(seed).permutation(n)
    succ = np.full(N_REGULAR, -1, np.int64)
    succ[order] = np.roll(order, -1)
    return succ


def acceptance_transform(ckpt_dir: Path, rate: float, seed: int, span: int | None = None):
    """The rewrite (for tests.tiny.rewrite_checkpoint) described in the module docstring."""
    from qwen35.convert.checkpoint import Checkpoint

    with Checkpoint(ckpt_dir) as ckpt:
        name = next(n for n in ckpt.tensors if n.endswith("embed_tokens.weight"))
        vocab, hidden = ckpt.tensors[name].shape
        unit = _from_bf16(ckpt.read_rows(name, 0, N_REGULAR))
    # Row blocks, in place: whole-matrix temporaries of a 9B vocabulary would take ~20 GB.
    blocks = [slice(start, start + 16384) for start in range(0, N_REGULAR, 16384)]
    for rows in blocks:
        unit[rows] /= np.sqrt(np.add.reduce(unit[rows] * unit[rows], axis=1))[:, None]
    succ = successor_cycle(seed, span)
    # Logit of the successor ~ 12·|unit·rmsnorm(e)|: a decided greedy choice at any quantization.
    output = np.zeros((vocab, hidden), np.uint16)  # BF16 bits; 0 is 0.0
    for rows in blocks:
        inside = succ[rows] >= 0
        output[succ[rows][inside]] = _to_bf16(unit[rows][inside] * np.float32(12.0 / np.sqrt(hidden)))
    noise = np.random.default_rng(seed + 1).standard_normal((hidden, hidden)).astype(np.float32) / np.sqrt(hidden)
    sigma = noise_for_rate(unit[:span] if span else unit, noise, rate, seed)
    fc = np.zeros((hidden, 2 * hidden), np.float32)  # [embedding part | hidden-state part]
    fc[:, :hidden] = np.eye(hidden, dtype=np.float32) + sigma * noise

    def transform(tensor: str, raw: np.ndarray):
        if tensor == "lm_head.weight":
            return [(tensor, output)]
        if tensor == "mtp.fc.weight":
            return [(tensor, _to_bf16(fc))]
        if tensor.endswith(_ZEROED) or tensor.endswith(_NEUTRAL_NORMS):
            return [(tensor, np.zeros_like(raw))]  # 0 is also a norm offset of 0: weight 1
        return [(tensor, raw)]

    return transform


def noise_for_rate(unit: np.ndarray, noise: np.ndarray, rate: float, seed: int, sample: int = 128) -> float:
    """σ at which the MTP head (fusion [I + σG, 0]) still predicts a fraction `rate` of a sample
    of tokens right: token t is right when its own unit embedding scores highest against
    (I + σG)·e_t. The scores are linear in σ, so two products serve the whole bisection."""
    if rate >= 1.0:
        return 0.0
    tokens = np.random.default_rng(seed + 2).choice(len(unit), sample, replace=False)
    x = unit[tokens].T  # [hidden, sample]
    base, slope = unit @ x, unit @ (noise @ x)  # [vocab, sample]
    cols = np.arange(sample)

    def right(sigma: float) -> float:
        scores = base + sigma * slope
        return float(np.mean(scores.argmax(axis=0) == tokens[cols]))

    low, high = 0.0, 1.0
    while right(high) > rate and high < 1e3:
        high *= 2
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if right(mid) > rate else (low, mid)
    return (low + high) / 2
