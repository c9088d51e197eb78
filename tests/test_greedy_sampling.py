"""Greedy decoding reads the argmax where llama.cpp left the logits (native.greedy_token) instead of
walking a copy of the whole vocabulary through the sampler chain: it must pick exactly the token
llama.cpp's greedy sampler picks, and only where the chain is greedy and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from qwen35.runtime.engine import native  # noqa: E402
from qwen35.runtime.engine.grammar import build_chain, draw  # noqa: E402


def chain_pick(logits: np.ndarray) -> int:
    """What llama.cpp's own greedy sampler selects from `logits`."""
    chain = build_chain(native.Sampling(temp=0), len(logits))
    try:
        return draw(chain, np.arange(len(logits), dtype=np.int32), logits)
    finally:
        native.L.llama_sampler_free(chain)


@pytest.mark.parametrize("logits", [
    [0.5, 2.0, 2.0, -1.0],                   # a tie: the first of the highest
    [-np.inf, -np.inf, -3.0, -np.inf],       # all but one ruled out
    [-np.inf, -np.inf, -np.inf],             # all ruled out: the first
    [1.0, 3.0, -2.0, 3.0 - 1e-6],            # within a millionth
])
def test_the_argmax_is_the_token_llama_cpps_greedy_sampler_picks(logits):
    logits = np.array(logits, np.float32)
    assert native.greedy_token(logits) == chain_pick(logits)


@pytest.mark.parametrize("logits", [[1.0, np.nan, 3.0], [np.nan, 1.0, 3.0]])
def test_a_nan_among_the_logits_leaves_the_choice_to_llama_cpp(logits):
    # numpy's argmax picks a NaN, llama.cpp's comparisons skip one after the first candidate: the
    # fast path stands aside and the chain decides, as before.
    logits = np.array(logits, np.float32)
    assert native.greedy_token(logits) is None
    sampler = native.Sampler(native.Sampling(temp=0), len(logits))
    try:
        assert sampler.sample_logits(logits) == chain_pick(logits)
    finally:
        sampler.close()


def test_greedy_sampling_picks_what_the_chain_picks_on_a_real_vocabulary_width():
    rng = np.random.default_rng(0)
    sampler = native.Sampler(native.Sampling(temp=0), 248_320)
    try:
        for _ in range(20):
            logits = rng.standard_normal(248_320).astype(np.float32)
            logits[rng.integers(0, len(logits))] = logits.max()  # a tie with the highest
            assert sampler.sample_logits(logits) == chain_pick(logits)
    finally:
        sampler.close()


def test_a_greedy_sampler_with_a_repeat_penalty_still_walks_the_chain():
    # The penalty lowers a token once it was picked: the second pick moves to the runner-up, which
    # an argmax of the raw logits would not see.
    logits = np.array([2.0, 1.9, 0.0], np.float32)
    sampler = native.Sampler(native.Sampling(temp=0, repeat_penalty=1.5), len(logits))
    try:
        assert [sampler.sample_logits(logits) for _ in range(2)] == [0, 1]
    finally:
        sampler.close()
