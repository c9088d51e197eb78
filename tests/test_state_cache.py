"""The state cache's choices on hand-made token sequences, over a stand-in context that records what
it is asked (no model): which checkpoints a switch between conversations keeps, and when the
insurance secure_live takes is dropped."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from qwen35.runtime.engine.native import FULL, PARTIAL_ONLY  # noqa: E402
from qwen35.runtime.engine.state_cache import PREFIX, TURN, StateCache  # noqa: E402


class StandInContext:
    """What StateCache asks of a llama.cpp context. Its state is the cells it holds, so a test can
    see that a restore really brought back the right prefix."""

    def __init__(self) -> None:
        self.cells: list[int] = []
        self.reads: list[tuple[tuple[int, ...], int]] = []

    def get_state(self, flags: int) -> bytearray:
        self.reads.append((tuple(self.cells), flags))
        return bytearray(repr((flags, self.cells)).encode())

    def set_state(self, data, flags: int) -> None:
        saved_flags, cells = eval(bytes(data).decode())  # noqa: S307 - our own repr, just above
        if flags == FULL:
            assert saved_flags == FULL, "a full restore needs a full checkpoint"
            self.cells = list(cells)

    def trim(self, pos: int) -> None:
        del self.cells[pos:]

    def clear(self) -> None:
        self.cells = []

    def state_size(self, flags: int) -> int:
        return 10 if flags == PARTIAL_ONLY else 10 + len(self.cells)


SYSTEM = (1, 2, 3)  # system prompt + tools, shared by both conversations
A = SYSTEM + (10, 11)  # conversation A's prompt (its turn boundary at the end)
REPLY_A = (20, 21)
B = SYSTEM + (30, 31)


def evaluate(cache: StateCache, ctx: StandInContext, tokens) -> None:
    cache.tokens += list(tokens)
    ctx.cells += list(tokens)


def answer_a(idle: bool) -> tuple[StateCache, StandInContext]:
    """Conversation A evaluated with its checkpoints and a reply; then, on a server, maybe an idle moment."""
    ctx = StandInContext()
    cache = StateCache(ctx, max_bytes=1 << 20)
    evaluate(cache, ctx, SYSTEM)
    cache.snapshot(PREFIX)
    evaluate(cache, ctx, A[len(SYSTEM):])
    cache.snapshot(TURN)
    evaluate(cache, ctx, REPLY_A)
    if idle:
        assert cache.secure_live()
    return cache, ctx


@pytest.mark.parametrize("idle", [False, True], ids=["switch at once", "switch after idle"])
def test_a_conversation_comes_back_after_another_ran(idle):
    """At a switch with no idle moment before it, the live conversation's deepest checkpoint is read
    out (its turn: the reply is evaluated again when it comes back, a few tokens); after an idle
    moment, the live state's end was (the reply too). Either way the other conversation's own
    checkpoints stay."""
    cache, ctx = answer_a(idle)
    assert cache.restore(list(B), limit=100) == len(SYSTEM)  # B shares the system prompt only
    evaluate(cache, ctx, B[len(SYSTEM):])
    cache.snapshot(TURN)
    follow_up = A + REPLY_A + (40, 41)
    kept = len(A + REPLY_A) if idle else len(A)
    assert cache.restore(list(follow_up), limit=100) == kept
    assert ctx.cells == list(follow_up[:kept])
    assert cache.restore(list(B + (50,)), limit=100) == len(B)
    assert ctx.cells == list(B)


def test_the_idle_insurance_goes_when_the_conversation_goes_on_and_stays_when_another_comes():
    cache, ctx = answer_a(idle=True)
    insurance = A + REPLY_A
    # The same conversation, its reply re-rendered otherwise (the template's canonical call):
    # it goes on from A's turn, and the insurance holds only a superseded branch.
    assert cache.restore(list(A + (22, 23)), limit=100) == len(A)
    assert insurance not in {c.tokens for c in cache.checkpoints()}

    cache, ctx = answer_a(idle=True)
    assert cache.restore(list(B), limit=100) == len(SYSTEM)
    kept = {c.tokens: c for c in cache.checkpoints()}
    assert kept[insurance].full
    # No second read at the switch: the insurance already keeps A.
    assert [cells for cells, flags in ctx.reads if flags == FULL] == [insurance]
