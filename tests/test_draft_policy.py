"""`auto` speculative decoding's choices, on hand-made step costs and simulated acceptance: how many
drafts a step makes (speculative.DraftPolicy), from the machine's step costs (speculative.StepCosts)
and the acceptance it has seen (speculative.Acceptance). The clock is the costs' own (a plain step
takes 1), so each figure is exact and the same on every machine; the engine's side — timing the
steps, remembering them — is tested in test_speculative_chat.py on real files."""

from __future__ import annotations

import random
from statistics import mean

import pytest

from qwen35.runtime.engine.errors import ChatError
from qwen35.runtime.engine.speculative import Acceptance, DraftPolicy, StepCosts


def decode(policy: DraftPolicy, costs: StepCosts, accept: float | list[float], tokens: int, seed: int = 0):
    """Decode `tokens` tokens as generation.py does, each draft right with probability `accept`
    (or accept[i] at token i); returns (speed over plain decoding, the tokens where a step drafted)."""
    rng = random.Random(seed)
    clock, made, drafted_at = 0.0, 0, []
    while made < tokens:
        p = accept[made] if isinstance(accept, list) else accept
        n = min(policy.n_draft(), tokens - made - 1)
        if n > 0:
            right = 0
            while right < n and rng.random() < p:
                right += 1
            policy.record(n, right)
            drafted_at.append(made)
            clock += costs.step[n - 1]
            made += right + 1
        else:
            policy.plain_step()
            clock += 1.0
            made += 1
    return made / clock, drafted_at


def speed(mode: str, costs: StepCosts, accept: float, tokens: int, max_draft: int = 3, seeds: int = 20) -> float:
    return mean(decode(DraftPolicy(mode, max_draft, costs if mode == "auto" else None), costs, accept, tokens, seed)[0]
                for seed in range(seeds))


CHEAP = StepCosts(step=(1.3, 1.6, 1.9))  # drafting pays from ~35% acceptance
VERY_CHEAP = StepCosts(step=(1.1, 1.2, 1.3))  # a machine where a 4-token verify costs ~1.2 tokens
MIDDLING = StepCosts(step=(1.5, 1.75, 3.0))  # two drafts best at 80%


def test_a_head_that_is_never_right_costs_under_3_percent_from_the_first_reply():
    for costs in (CHEAP, VERY_CHEAP, MIDDLING):
        # A first reply of 19 tokens: at most two single-draft steps before plain decoding.
        first, drafted_at = decode(DraftPolicy("auto", 3, costs), costs, 0.0, 19)
        assert first >= 0.97 and len(drafted_at) <= 4, (costs, first, drafted_at)
    policy = DraftPolicy("auto", 3, CHEAP)
    overall, drafted_at = decode(policy, CHEAP, 0.0, 4000)
    assert overall >= 0.99
    # Probes of two single-draft steps after 32 plain tokens, then 64, 128, … (each found drafting
    # still loses).
    runs = []  # (first token, steps) of each stretch of drafting steps
    for t in drafted_at:
        if runs and t == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    assert runs[0] == [0, 1] and all(steps == 2 for _, steps in runs[1:]), runs
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(runs, runs[1:])]
    assert gaps == [32, 64, 128, 256, 512, 1024, 2048][:len(gaps)] and len(gaps) >= 6, runs
    assert policy.n_draft() == 0


@pytest.mark.parametrize("costs", [CHEAP, VERY_CHEAP, MIDDLING])
@pytest.mark.parametrize("accept", [0.0, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0])
def test_auto_keeps_97_percent_of_the_better_of_plain_and_always_drafting(costs, accept):
    """The issue's bar, over replies of 400 tokens (20 seeds): `auto` with up to 3 drafts against
    plain decoding and against drafting 3 every step. Against the best fixed number of drafts it
    keeps at least 92% (the worst here: 80% acceptance's neighbours near the break-even, where
    noise in the estimate sends it to plain decoding until the next probe)."""
    tokens = 400
    always = speed("mtp", costs, accept, tokens, max_draft=3)
    auto = speed("auto", costs, accept, tokens)
    assert auto >= 0.97 * max(1.0, always), (auto, always)
    best_fixed = max([1.0] + [speed("mtp", costs, accept, tokens, max_draft=n) for n in (1, 2)] + [always])
    assert auto >= 0.92 * best_fixed, (auto, best_fixed)


def test_auto_drafts_as_many_as_pay_at_the_acceptance_it_sees():
    # At 80% on MIDDLING: one draft 1.8 / 1.5 = 1.2, two 2.44 / 1.75 = 1.39, three 2.95 / 3.0 = 0.98.
    policy = DraftPolicy("auto", 3, MIDDLING)
    decode(policy, MIDDLING, 0.8, 300)
    assert policy.n_draft() == 2
    policy = DraftPolicy("auto", 3, VERY_CHEAP)
    decode(policy, VERY_CHEAP, 0.8, 300)
    assert policy.n_draft() == 3
    # It starts with one draft a step, and widens only as drafts prove right.
    policy = DraftPolicy("auto", 3, VERY_CHEAP)
    assert policy.n_draft() == 1
    policy.record(1, 1)
    assert policy.n_draft() == 2


def test_auto_follows_a_change_of_acceptance_both_ways():
    """Text the head predicts well, then text it cannot (0%), then well again: auto stops drafting
    soon after the change, and a probe finds drafting again."""
    accept = [0.9] * 300 + [0.0] * 600 + [0.9] * 1200
    policy = DraftPolicy("auto", 3, CHEAP)
    _, drafted_at = decode(policy, CHEAP, accept, len(accept))
    in_the_middle = [t for t in drafted_at if 320 <= t < 900]
    # (the estimate weighs the last ~30 tries: it takes some 20 failed steps to fall below the
    # break-even from 90%, then probes only)
    assert len(in_the_middle) <= 30, in_the_middle
    assert policy.n_draft() > 0
    assert sum(1 for t in drafted_at if t >= 1100) > 100  # drafting again, long before the end


def test_acceptance_estimate_on_hand_made_steps():
    a = Acceptance()
    assert a.rate == pytest.approx(0.6)  # the prior alone
    a.observe(3, 1)  # one right, then a wrong one: 1 of 2 tries
    assert (a.right, a.tries) == (pytest.approx(0.97), pytest.approx(0.97 + 1))
    assert a.rate == pytest.approx((0.97 + 0.6) / (1.97 + 1))
    a.observe(2, 2)  # both right: 2 of 2 (no wrong one seen)
    assert a.ever_right == 3
    for _ in range(200):
        a.observe(1, 0)
    assert a.rate < 0.03
    a.age(300)  # a long stretch of plain decoding: the old tries have faded, one new one speaks
    a.observe(1, 1)
    assert a.rate > 0.75


def test_a_step_costs_less_when_every_draft_is_kept():
    """Nothing to roll back when all drafts are right: the cost is weighed by how often that is."""
    costs = StepCosts(step=(2.0, 3.0), kept=(1.0, 2.0))
    assert costs.cost(1, 0.5) == pytest.approx(0.5 * 1.0 + 0.5 * 2.0)
    assert costs.cost(2, 0.5) == pytest.approx(0.25 * 2.0 + 0.75 * 3.0)
    assert costs.speedup(2, 1.0) == pytest.approx(3 / 2.0) and costs.speedup(2, 0.0) == pytest.approx(1 / 3.0)
    assert StepCosts(step=(2.0,)).cost(1, 0.9) == 2.0  # (measured before the kept steps were)


def test_where_the_prior_alone_does_not_pay_the_first_step_probes():
    """Steps of one draft at 1.7 plain steps' time (0.8B on the Xeon): at the prior's 60% one draft
    would not pay (1.6 / 1.7), so `auto` would decode its first 32 tokens plainly even with a perfect
    head. It probes at once instead: a good head drafts from the start, a bad one costs one step."""
    costs = StepCosts(step=(1.72, 2.38, 2.86), kept=(1.69, 2.40, 2.82))
    good = DraftPolicy("auto", 3, costs)
    _, drafted_at = decode(good, costs, 1.0, 128)
    assert drafted_at[:3] == [0, 2, 4] and good.n_draft() == 3
    bad = DraftPolicy("auto", 3, costs)
    first, drafted_at = decode(bad, costs, 0.0, 40)
    assert drafted_at == [0, 33, 34]  # the first step, then a probe after 32 plain tokens
    assert first >= 40 / (37 + 1.72 + 2 * 1.72) - 1e-9


def test_the_modes():
    assert DraftPolicy("mtp", 3).n_draft() == 3 and DraftPolicy("off", 3).n_draft() == 0
    with pytest.raises(ChatError, match="speculative must be one of"):
        DraftPolicy("fast")
    with pytest.raises(ChatError, match="step costs"):
        DraftPolicy("auto", 2)
