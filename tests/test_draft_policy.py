"""`auto` speculative decoding's choices, on hand-made step costs and simulated acceptance: how many
drafts a step makes (speculative.DraftPolicy), from the machine's step costs (speculative.StepCosts,
given or learnt by a speculative.StepClock from the steps' timings) and the acceptance it has seen
(speculative.Acceptance). The clock is the costs' own (a plain step takes 1), so each figure is exact
and the same on every machine; the engine's side — timing real steps, remembering the costs — is
tested in test_speculative_chat.py on real files."""

from __future__ import annotations

import random
from statistics import mean

import pytest

from qwen35.runtime.engine.errors import ChatError
from qwen35.runtime.engine.speculative import Acceptance, DraftPolicy, StepClock, StepCosts


def decode(policy: DraftPolicy, costs: StepCosts, accept: float | list[float], tokens: int, seed: int = 0,
           timed: bool = False, prompt: int = 0):
    """Decode `tokens` tokens as generation.py does, each draft right with probability `accept`
    (or accept[i] at token i); returns (speed over plain decoding, the tokens where a step drafted).
    `timed`: each step tells the policy its time, as generation.py does (a step of every draft
    right takes costs.kept's time where the costs have it). `prompt`: first show the policy the
    head's would-be drafts of that many prompt tokens, right with the same probability, as the
    decoder does while the policy wants them."""
    rng = random.Random(seed)
    clock, made, drafted_at = 0.0, 0, []
    if prompt and policy.wants_text():
        p = accept[0] if isinstance(accept, list) else accept
        policy.observe_text(sum(rng.random() < p for _ in range(prompt)), prompt)
    while made < tokens:
        p = accept[made] if isinstance(accept, list) else accept
        n = min(policy.n_draft(), tokens - made - 1)
        if n > 0:
            right = 0
            while right < n and rng.random() < p:
                right += 1
            took = costs.kept[n - 1] if right == n and costs.kept else costs.step[n - 1]
            policy.record(n, right, took if timed else None)
            drafted_at.append(made)
            clock += took
            made += right + 1
        else:
            policy.plain_step(1.0 if timed else None)
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
        # A first reply of 19 tokens: a handful of single-draft steps at most before plain decoding
        # (the cheaper a draft, the longer the prior's 60% keeps one paying: five at 1.1).
        first, drafted_at = decode(DraftPolicy("auto", 3, costs), costs, 0.0, 19)
        assert first >= 0.97 and len(drafted_at) <= 5, (costs, first, drafted_at)
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


# Measured through the server at 0.8B dimensions (learnt, 0.8B on the Xeon) and remembered at 4B.
XEON_08B = StepCosts(step=(1.55, 1.86, 2.17))
XEON_4B = StepCosts(step=(1.5553, 1.6704, 1.7856), kept=(1.5553, 1.6388, 1.7224))


@pytest.mark.parametrize("costs", [XEON_08B, XEON_4B, CHEAP])
@pytest.mark.parametrize("accept", [0.0, 0.3, 0.7, 0.8, 1.0])
def test_a_head_remembered_keeps_97_percent_of_the_better_way_from_a_reply_of_128_tokens(costs, accept):
    """A later load knows the head (its rate from the sessions before) and the machine (the costs):
    over one reply of 128 tokens, as bench_mtp.py measures, `auto` keeps 97% of the better of plain
    decoding and drafting 1, 2 or 3 every step, and never falls below 97% of plain."""
    seeds = range(24)
    best = max([1.0] + [mean(decode(DraftPolicy("mtp", n), costs, accept, 128, seed)[0] for seed in seeds)
                        for n in (1, 2, 3)])
    auto = mean(decode(DraftPolicy("auto", 3, costs, known_acceptance=(200 * accept, 200)), costs, accept, 128,
                       seed)[0] for seed in seeds)
    assert auto >= 0.97 * best, (auto, best)


def test_a_good_heads_first_wrong_draft_is_bad_luck_when_it_is_known():
    """Unknown, one wrong first draft sends `auto` plain for a probe interval (it cannot tell a head
    right 80% of the time from one never right); known at 80%, it drafts on, and as wide as pays."""
    unknown = DraftPolicy("auto", 3, XEON_4B)
    unknown.record(unknown.n_draft(), 0)
    assert unknown.n_draft() == 0
    known = DraftPolicy("auto", 3, XEON_4B, known_acceptance=(160.0, 200.0))
    assert known.acceptance.rate == pytest.approx(0.8) and known.n_draft() == 3
    known.record(3, 0)
    weight = Acceptance.KNOWN_TRIES * Acceptance.KNOWN_FADE  # (the remembered rate weighs less with each try)
    assert known.acceptance.rate == pytest.approx(0.8 * weight / (1 + weight)) and known.n_draft() == 3
    # A head remembered as never right waits a probe interval instead of probing at once.
    never = DraftPolicy("auto", 3, XEON_4B, known_acceptance=(0.0, 500.0))
    _, drafted_at = decode(never, XEON_4B, 0.0, 100)
    assert drafted_at == [32, 33, 98], drafted_at  # (then after 64: nothing right)
    # Remembered as never right, but right now (other text, another use): its probes find it again.
    now_right = DraftPolicy("auto", 3, XEON_4B, known_acceptance=(0.0, 500.0))
    _, drafted_at = decode(now_right, XEON_4B, 0.9, 800)
    assert len([t for t in drafted_at if t >= 400]) > 60, drafted_at
    # Fewer tries than KNOWN_ENOUGH do not stand for the head: the prior does.
    assert DraftPolicy("auto", 3, known_acceptance=(10.0, 10.0)).acceptance.rate == pytest.approx(Acceptance.PRIOR)


def test_what_a_session_sees_of_the_head_is_handed_on():
    """At 32 tries, then each time they double: this session's count, with what was remembered before
    at half weight (so a head's old rate fades over sessions). Any mode that drafts hands it on."""
    handed = []
    policy = DraftPolicy("mtp", 3, known_acceptance=(40.0, 100.0), remember_acceptance=lambda *a: handed.append(a))
    for _ in range(10):
        policy.record(3, 3)  # 3 right of 3 tries each
    assert handed == []  # 30 tries
    policy.record(3, 3)
    assert handed == [(20.0 + 33, 50.0 + 33)]
    for _ in range(11):
        policy.record(3, 2)  # 2 right of 3 tries
    assert handed[-1] == (20.0 + 33 + 22, 50.0 + 33 + 33) and len(handed) == 2


def test_the_modes():
    assert DraftPolicy("mtp", 3).n_draft() == 3 and DraftPolicy("off", 3).n_draft() == 0
    with pytest.raises(ChatError, match="speculative must be one of"):
        DraftPolicy("fast")
    assert DraftPolicy("auto", 2).costs == StepClock(2).costs()  # nothing timed yet: the prior


# --- learning the costs from the steps (StepClock) ---------------------------------------------------


def test_the_clock_gives_ratios_of_medians_dropping_each_shapes_first_timing():
    clock = StepClock(3)
    assert clock.costs().step == (1.5, 1.75, 2.0)  # the prior: later drafts add half what the first did
    for seconds in (0.9, 0.2, 0.21, 0.19, 0.5):  # plain: 0.9 builds the graph; median of the rest 0.205
        clock.add(0, False, seconds)
    assert clock.count(0) == 4 and clock.costs().plain_s == pytest.approx(0.205)
    clock.add(1, False, 5.0)  # first of its shape: dropped
    assert clock.costs().step[0] == 1.5
    for seconds in (0.246, 0.25, 0.3):
        clock.add(1, False, seconds)
    c = clock.costs()
    assert c.step[0] == pytest.approx(round(0.25 / 0.205, 4))
    # Kept whole not timed yet: taken as the rolled-back step; two and three drafts extrapolated, each
    # further draft adding half what the one timed draft added (it also paid the step's fixed costs).
    assert c.kept[0] == c.step[0]
    assert c.step[1] == pytest.approx(c.step[0] + (c.step[0] - 1.0) / 2, abs=1e-3)
    assert c.step[2] == pytest.approx(c.step[1] + (c.step[0] - 1.0) / 2, abs=1e-3)
    clock.add(1, True, 9.0)  # kept whole: a shape of its own, its first timing dropped
    clock.add(1, True, 0.2255)
    assert clock.costs().kept[0] == pytest.approx(1.1) and clock.costs().step[0] == c.step[0]
    # A count never below the one before it, whatever the noise said.
    for seconds in (1.0, 0.1, 0.1):
        clock.add(2, False, seconds)
    assert clock.costs().step[1] == pytest.approx(0.1 / 0.205, abs=1e-3)
    assert clock.costs().step[2] == clock.costs().step[1]


def test_a_count_not_timed_lies_between_the_timed_ones():
    clock = StepClock(3)
    for seconds in (1.0, 0.1, 0.1, 0.1):
        clock.add(0, False, seconds)
        clock.add(2, True, 2 * seconds)  # (a good head: it went to two drafts at once)
    # One on the line from plain (1) to two (2); three beyond, by half what each of the two drafts added.
    assert clock.costs().step == (1.5, 2.0, 2.25)
    for seconds in (1.0, 0.13, 0.13, 0.13):
        clock.add(1, False, seconds)
    # Two counts timed: three grows as they do.
    assert clock.costs().step == (1.3, 2.0, 2.7)


def test_a_count_timed_too_few_times_costs_no_more_than_its_guess():
    """One slow timing must not keep a count from being tried again: until it has ENOUGH timings, a
    count costs the less of its timings' median and what it would be guessed at untimed."""
    clock = StepClock(3)
    for seconds in (1.0, 0.1, 0.1, 0.1):
        clock.add(0, False, seconds)
        clock.add(1, False, 1.5 * seconds)
    assert clock.costs().step == (1.5, 1.75, 2.0)
    clock.add(3, True, 1.0)  # dropped (the graph)
    clock.add(3, True, 0.3)  # once, on a busy moment: 3.0, where 2.0 is the guess
    assert clock.costs().step[2] == 2.0
    clock.add(3, True, 0.22)
    assert clock.costs().step[2] == 2.0  # (median 2.6 of two)
    clock.add(3, True, 0.22)
    assert clock.costs().step[2] == 2.2  # timed enough: what it measured


def test_a_stall_is_not_taken_for_a_steps_cost():
    clock = StepClock(2)
    for seconds in (1.0, 0.1, 0.1, 0.1):
        clock.add(0, False, seconds)
    for seconds in (1.0, 0.15, 0.15, 0.15, 100.0, 100.0, 100.0):  # three stalls of another program
        clock.add(1, False, seconds)
    clock.add(0, False, 0.35)  # (less than 4 plain steps: kept)
    assert clock.count(1) == 3 and clock.count(0) == 4 and clock.costs().step[0] == pytest.approx(1.5)
    clock.add(2, True, 1.0)
    clock.add(2, True, 1.3)  # more than 4 x 3 plain steps
    assert clock.count(2) == 0


def test_the_clock_keeps_the_latest_timings_only():
    clock = StepClock(1)
    for seconds in [1.0] + [0.1] * 9 + [0.3] * 9:  # the machine became three times slower
        clock.add(0, False, seconds)
    assert clock.costs().plain_s == pytest.approx(0.3)


def test_the_clock_hands_on_what_it_learnt_once_each_count_is_timed_enough():
    learnt = []
    clock = StepClock(3, learned=learnt.append)
    for _ in range(1 + StepClock.ENOUGH):
        clock.add(1, False, 0.3)
    assert learnt == []  # the plain step is not timed yet
    for _ in range(StepClock.ENOUGH):
        clock.add(0, False, 0.2)
    assert learnt == []  # the first plain timing was dropped
    clock.add(0, False, 0.2)
    assert learnt == [StepCosts(step=(1.5,), kept=(1.5,), plain_s=0.2)]
    clock.add(0, False, 0.2)
    assert len(learnt) == 1  # nothing new
    for _ in range(StepClock.ENOUGH):
        clock.add(3, False, 0.5)  # three drafts timed (all but the first kept), two not: not handed on
    assert len(learnt) == 1
    for _ in range(1 + StepClock.ENOUGH):
        clock.add(2, True, 0.4)
    assert learnt[-1] == StepCosts(step=(1.5, 2.0), kept=(1.5, 2.0), plain_s=0.2)
    clock.add(3, False, 0.5)
    assert learnt[-1] == StepCosts(step=(1.5, 2.0, 2.5), kept=(1.5, 2.0, 2.5), plain_s=0.2) and len(learnt) == 3
    for _ in range(StepClock.WINDOW):  # once more when the plain step's window is full, then not again
        clock.add(0, False, 0.25)
    assert len(learnt) == 4 and learnt[-1].plain_s == 0.25 and learnt[-1].step == (1.2, 1.6, 2.0)


def test_remembered_costs_stand_for_the_counts_they_cover():
    known = StepCosts(step=(1.2,), kept=(1.1,), plain_s=0.1)
    clock = StepClock(2, known=known)
    for seconds in (1.0, 0.1, 0.1, 0.1):
        clock.add(0, False, seconds)
        clock.add(1, False, 10 * seconds)  # not what was remembered: the remembered stands
    for seconds in (1.0, 0.15, 0.15, 0.15):
        clock.add(2, False, seconds)
    assert clock.costs() == StepCosts(step=(1.2, 1.5), kept=(1.1, 1.5), plain_s=0.1)
    assert not StepClock(1, known=known).needs_plain() and StepClock(2, known=known).needs_plain()


# Measured: a first draft that pays the drafting step's fixed costs, later ones cheap (0.8B dimensions on
# the Xeon, through the server: learnt 1.66 for one draft, 1.51/1.80/2.09 timed at three).
FIXED_FIRST = StepCosts(step=(1.66, 1.95, 2.24))


@pytest.mark.parametrize("costs", [CHEAP, VERY_CHEAP, MIDDLING, StepCosts(step=(1.72, 2.38, 2.86)),
                                   StepCosts(step=(2.7, 3.4, 4.1)), FIXED_FIRST])
def test_auto_learning_its_costs_keeps_its_promise_from_the_first_reply(costs):
    """No costs known (a first load): `auto` decodes by the prior and the timings of its own steps.
    A head never right costs about one step, as with the costs known; over a long conversation it
    keeps 97% of the better of plain decoding and always drafting at any acceptance."""
    first, drafted_at = decode(DraftPolicy("auto", 3), costs, 0.0, 19, timed=True)
    assert len(drafted_at) <= 2 and first >= 19 / (17 + 2 * costs.step[0]) - 1e-9, drafted_at
    if costs.step[0] <= 1.5:
        assert first >= 0.97
    for accept in (0.0, 0.5, 0.8, 1.0):
        always = speed("mtp", costs, accept, 1000)
        learnt = mean(decode(DraftPolicy("auto", 3), costs, accept, 1000, seed, timed=True)[0] for seed in range(10))
        assert learnt >= 0.97 * max(1.0, always), (accept, learnt, always)


def test_a_head_right_from_the_start_still_times_the_plain_step():
    policy = DraftPolicy("auto", 3)
    _, drafted_at = decode(policy, VERY_CHEAP, 1.0, 200, timed=True)
    assert policy.clock.count(0) >= StepClock.ENOUGH and policy.n_draft() == 3
    assert policy.costs.step == pytest.approx(VERY_CHEAP.step)
    assert len(drafted_at) < 70  # (200 tokens, 4 a step when drafting 3)


def test_remembered_costs_of_one_draft_still_let_auto_find_more_drafts_pay():
    """A first load remembered only one draft's cost (as the server's did at 0.8B): a later load at 75%
    acceptance must still try two and three drafts, not take three as three times one (one draft:
    1.05x; three: 1.22x)."""
    known = StepCosts(step=FIXED_FIRST.step[:1], kept=FIXED_FIRST.step[:1], plain_s=0.05)
    always = speed("mtp", FIXED_FIRST, 0.75, 1000)
    policies = [DraftPolicy("auto", 3, clock=StepClock(3, known=known)) for _ in range(10)]
    learnt = mean(decode(p, FIXED_FIRST, 0.75, 1000, seed, timed=True)[0] for seed, p in enumerate(policies))
    assert always > 1.15 and learnt >= 0.97 * always, (learnt, always)
    assert all(p.clock.count(3) >= StepClock.ENOUGH for p in policies)  # three drafts were tried and timed


def test_what_the_head_makes_of_the_prompt_decides_its_first_steps():
    """A head not known here is first judged by what it would have drafted of the prompt's last 8
    tokens (each weighed half a try): one that gets none right starts plainly — the 19-token first
    reply that cost it a single-draft step or two costs nothing — and one right there drafts as
    many as pay from its first step, where the prior alone started at one draft and a wrong first
    draft (one load in five at 80%) sent it plain for 32 tokens. A known head's prompts are not
    looked at, nor are they once it has been tried enough here."""
    for costs in (CHEAP, VERY_CHEAP, MIDDLING, FIXED_FIRST, None):
        policy = DraftPolicy("auto", 3, costs)
        assert policy.wants_text()
        first, drafted_at = decode(policy, costs or FIXED_FIRST, 0.0, 19, timed=costs is None, prompt=8)
        assert drafted_at == [] and first == 1.0, costs
        good = DraftPolicy("auto", 3, costs)
        good.observe_text(8, 8)
        assert good.n_draft() == (2 if costs is MIDDLING else 3), costs  # (MIDDLING: 2 pay best)
    # Right after 4 of 8 (below the prior's 60%): read text says little of the head's replies; the
    # prior stands, the first steps only widen (measured: a head right 80% in its replies, 4 of 8).
    middling = DraftPolicy("auto", 3, CHEAP)
    middling.observe_text(4, 8)
    assert middling.acceptance.rate == pytest.approx(Acceptance.PRIOR) and middling.n_draft() > 0
    assert middling.acceptance.ever_right == 4
    # First loads (nothing known, the costs learnt) at 80%, replies of 128 tokens over 40 seeds.
    # (On MIDDLING, where a third draft costs as much as it brings, both ways come out level.)
    for costs in (CHEAP, FIXED_FIRST):
        looked, blind = (mean(decode(DraftPolicy("auto", 3), costs, 0.8, 128, seed, timed=True, prompt=prompt)[0]
                              for seed in range(40)) for prompt in (8, 0))
        assert looked > blind, (costs, looked, blind)
    # A probe under way ends as planned; a known head, or one tried enough, is not judged by prompts.
    probing = DraftPolicy("auto", 3, CHEAP)
    _, drafted_at = decode(probing, CHEAP, 0.0, 33)  # a wrong first draft, then 32 plain tokens
    assert drafted_at == [0] and probing.n_draft() == 1  # the probe's first single-draft step
    probing.record(1, 0)
    assert probing.wants_text()
    probing.observe_text(0, 8)
    assert probing.n_draft() == 1  # its second
    assert not DraftPolicy("auto", 3, CHEAP, known_acceptance=(80.0, 100.0)).wants_text()
    assert not DraftPolicy("mtp", 3).wants_text() and not DraftPolicy("off", 3).wants_text()
    tried = DraftPolicy("auto", 3, CHEAP)
    decode(tried, CHEAP, 0.8, 120)
    assert tried.acceptance.total_tries >= 32 and not tried.wants_text()
    # Nor beyond a session's first two prompts (a head seldom right would be looked at on every one).
    never = DraftPolicy("auto", 3, CHEAP)
    for _ in range(2):
        assert never.wants_text()
        never.observe_text(0, 8)
    assert not never.wants_text() and never.acceptance.total_tries == 0
