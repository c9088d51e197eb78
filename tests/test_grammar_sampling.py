"""Constrained sampling (engine/grammar.py) is exact: on a small vocabulary with known logits, the
tokens drawn under a grammar follow the free-text distribution restricted to the allowed tokens
and renormalized (chi-square), whether the first draw is kept, drawn again among the allowed
candidates, or (none allowed among them) drawn by the chain over the allowed tokens alone; greedy
decoding picks the best allowed token; a refused draw is the only one that costs a mask."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from qwen35.runtime.engine import native  # noqa: E402

# Eight tokens; the free-text distribution at temperature 1 with top-k 4 keeps tokens 0..3.
LOGITS = np.array([2.0, 1.6, 1.2, 0.9, 0.5, 0.3, -0.2, -1.0], np.float32)
CHI2_P001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # p = 0.001


class FixedGrammar:
    """A grammar that allows the same tokens at every step, counting its masks."""

    def __init__(self, allowed: set[int], n_vocab: int = len(LOGITS)) -> None:
        self.mask = np.zeros(n_vocab, bool)
        self.mask[list(allowed)] = True
        self.masks = 0
        self.accepted: list[int] = []

    def allows(self, token: int) -> bool:
        return bool(self.mask[token])

    def allowed(self) -> np.ndarray:
        self.masks += 1
        return self.mask.copy()

    def accept(self, token: int) -> None:
        assert self.mask[token], "a refused token was accepted"
        self.accepted.append(token)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _draws(sampling: native.Sampling, grammar, runs: int) -> np.ndarray:
    sampler = native.Sampler(sampling, len(LOGITS), grammar=grammar)
    try:
        return np.bincount([sampler.sample_logits(LOGITS) for _ in range(runs)], minlength=len(LOGITS))
    finally:
        sampler.close()


def _chi2(counts: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {counts}"
    e = expected[support] * counts.sum()
    return float(((counts[support] - e) ** 2 / e).sum()), int(support.sum()) - 1


@pytest.mark.parametrize("allowed, expected_support", [
    ({0, 2, 5}, {0, 2}),     # some of the top-4 allowed: p restricted to {0, 2}
    ({1, 3, 4, 6}, {1, 3}),  # the most likely token refused
    ({4, 5, 6}, {4, 5, 6}),  # none of the top-4 allowed: top-4 of the allowed, by the chain
])
def test_sampled_tokens_follow_the_distribution_restricted_to_the_allowed_tokens(allowed, expected_support):
    sampling = native.Sampling(temp=1.0, top_k=4, top_p=1.0, seed=1234)
    runs = 3000
    grammar = FixedGrammar(allowed)
    counts = _draws(sampling, grammar, runs)
    top4 = set(np.argsort(-LOGITS)[:4].tolist())
    kept = allowed & top4 or allowed  # p(A) > 0: p restricted to A; else the chain over A alone
    masked = np.where(np.isin(np.arange(len(LOGITS)), sorted(kept)), LOGITS, -np.inf)
    expected = _softmax(masked)
    assert set(np.flatnonzero(expected).tolist()) == expected_support
    chi2, dof = _chi2(counts, expected)
    assert chi2 < CHI2_P001[dof], (chi2, counts, expected)
    # Only a refused first draw costs a mask: about (1 - p(A)) of the draws.
    p_free = _softmax(np.where(np.isin(np.arange(len(LOGITS)), sorted(top4)), LOGITS, -np.inf))
    refused = 1 - p_free[sorted(allowed & top4)].sum()
    assert abs(grammar.masks / runs - refused) < 0.05, (grammar.masks, refused)
    assert len(grammar.accepted) == runs


def test_with_top_p_and_min_p_the_truncation_is_that_of_free_text():
    """Top-p 0.8 at temperature 0.7 keeps tokens 0..2 of free text; restricted to {1, 2, 6}: {1, 2}."""
    sampling = native.Sampling(temp=0.7, top_k=0, top_p=0.8, min_p=0.05, seed=99)
    probs = _softmax(LOGITS / 0.7)
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    nucleus = set(order[:int(np.searchsorted(cumulative, 0.8)) + 1].tolist())
    assert nucleus == {0, 1, 2}
    counts = _draws(sampling, FixedGrammar({1, 2, 6}), 3000)
    expected = np.zeros(len(LOGITS))
    expected[[1, 2]] = probs[[1, 2]] / probs[[1, 2]].sum()
    chi2, dof = _chi2(counts, expected)
    assert chi2 < CHI2_P001[dof], (chi2, counts, expected)


def test_greedy_picks_the_best_allowed_token_and_masks_only_when_refused():
    for allowed, best in (({3, 5}, 3), ({0, 7}, 0), ({6, 7}, 6)):
        grammar = FixedGrammar(allowed)
        counts = _draws(native.Sampling(temp=0), grammar, 5)
        assert counts[best] == 5
        assert grammar.masks == (0 if best == 0 else 5)


def test_penalties_follow_the_tokens_accepted_on_every_path():
    """A presence penalty on the fallback draw (the grammar-first chain) sees the same history as
    the main chain: greedy with a strong penalty moves to the other allowed token once one is used."""
    grammar = FixedGrammar({5, 6})
    sampler = native.Sampler(native.Sampling(temp=0, presence_penalty=5.0), len(LOGITS), grammar=grammar)
    try:
        tokens = [sampler.sample_logits(LOGITS) for _ in range(4)]
    finally:
        sampler.close()
    assert tokens == [5, 6, 5, 5]  # (a presence penalty counts a token once)


def test_an_error_in_the_grammar_is_raised_not_swallowed_by_llama_cpp():
    class Broken(FixedGrammar):
        def allows(self, token: int) -> bool:
            raise RuntimeError("grammar broke")

    sampler = native.Sampler(native.Sampling(temp=0), len(LOGITS), grammar=Broken({0}))
    try:
        with pytest.raises(RuntimeError, match="grammar broke"):
            sampler.sample_logits(LOGITS)
    finally:
        sampler.close()


def test_without_llguidance_structured_output_falls_back_to_llama_cpps_grammar_with_one_notice():
    """Where llguidance cannot be installed (32-bit ARM, musl), a session says so in one warning and
    a JSON schema is still enforced, by llama.cpp's grammar sampler."""
    import json
    import subprocess
    import sys

    from tests.test_runtime import build_tiny_gguf

    script = ("import sys, json\n"
              "sys.modules['llguidance'] = None  # (as if it could not be installed)\n"
              "from qwen35.runtime import ChatSession\n"
              "from qwen35.runtime.conversation import constraints\n"
              "schema = {'type': 'object', 'required': ['answer'], 'additionalProperties': False,\n"
              "          'properties': {'answer': {'type': 'string', 'enum': ['yes', 'no']}}}\n"
              "with ChatSession(sys.argv[1], n_ctx=512, threads=1, prefill=False, temp=0.8, seed=3) as s:\n"
              "    text = ''.join(p.text for p in s.respond([{'role': 'user', 'content': 'Yes or no?'}],\n"
              "                   constraint=constraints.json_constraint(schema), think=False, max_tokens=40))\n"
              "    print(json.dumps({'fast': constraints.FAST, 'warnings': s.warnings, 'text': text}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(build_tiny_gguf())], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["fast"] is False
    from qwen35.runtime.conversation.constraints import FALLBACK_NOTICE

    assert out["warnings"].count(FALLBACK_NOTICE) == 1, out["warnings"]
    assert json.loads(out["text"]) in ({"answer": "yes"}, {"answer": "no"}), out["text"]
