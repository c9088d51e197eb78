"""Speculative decoding with the model's own multi-token-prediction (MTP) head.

Every Qwen3.5 release ships one MTP block: given a token and the target model's hidden state at the
token before it, it predicts the token after. llama.cpp runs it in a second context of type
LLAMA_CONTEXT_TYPE_MTP over the same weights; the draft/verify loop itself is in llama.cpp's C++
`common/` library, which the Python bindings do not export, so it is written here.

One step, with p tokens in the model state and x the last sampled token (not yet evaluated):
1. draft: the MTP context evaluates x at p with the target's hidden state of token p-1, takes the
   most likely token d1, evaluates d1 at p+1 with its own hidden state, … up to d_n; those
   positions are then dropped from the MTP context again;
2. verify: the target evaluates [x, d1..d_n] in one decode with logits for every row, and the
   caller's sampler chain samples row after row while the sample equals the draft: y_0 (always),
   y_1 if y_0 == d1, …. Each emitted token is drawn from the target's own distribution at its
   position, so the output is the target's, greedy or sampled (the draft only decides how many
   rows are looked at);
3. keep: the caller keeps [x, y_0..y_{k-1}] (k+1 tokens, at least x): the target drops the rest of
   the decode with the recurrent-state snapshots of `n_rollback` (never the whole decode, which
   llama.cpp cannot restore: upstream bug #26695), and the MTP context follows.

After every target decode — prompt, plain step or verify — the MTP context evaluates the same
tokens, each paired with the target's hidden state of the token before it (`feed`), so its KV cache
and the pending hidden state always describe exactly what the target holds.

The hidden-state functions are outside llama.cpp's stable API (llama-ext.h, bound by mangled
name in llama_cpp.llama_cpp_ext); `open_speculator` checks for them and says why it falls back to
plain decoding when they or the MTP block are missing.
"""

from __future__ import annotations

import ctypes
import struct
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from statistics import median
from typing import Callable

import numpy as np

import llama_cpp as L

from . import native, remembered
from .errors import ChatError

# The stable-API part of what the loop needs (llama.h's extended batch: a token with a hidden state).
_BATCH_API = ("llama_batch_ext_init", "llama_batch_ext_free", "llama_batch_ext_clear", "llama_batch_ext_add_token",
              "llama_batch_ext_set_pos", "llama_batch_ext_set_embd_token", "llama_batch_ext_set_output_logits",
              "llama_process", "llama_embd", "LLAMA_CONTEXT_TYPE_MTP")


def staging_api():
    """(llama_cpp_ext, None) when this llama-cpp-python has what MTP needs, else (None, reason)."""
    missing = [name for name in _BATCH_API if not hasattr(L, name)]
    if missing:
        return None, f"this llama-cpp-python lacks {', '.join(missing)}"
    try:
        # Binding happens at import: a missing symbol raises AttributeError there.
        from llama_cpp import llama_cpp_ext
    except (ImportError, AttributeError) as e:
        return None, f"this llama-cpp-python does not export llama.cpp's hidden-state functions ({e})"
    return llama_cpp_ext, None


def mtp_block_count(model_file) -> int:
    """MTP blocks in a GGUF (from its header, before anything is loaded)."""
    return int(model_file.arch_key("nextn_predict_layers", 0) or 0)


# Drafts come from the output rows of the 32,768 most frequent tokens (draft_head.py): FR-Spec's
# size, where its authors kept nearly all of the whole vocabulary's acceptance, and here a draft's
# output layer costs 0.05x a token instead of 0.35x (0.8B) or 0.21x (4B). 0 drafts from the whole
# vocabulary.
DRAFT_VOCAB = 32768


class Speculator:
    """The MTP draft provider for one target context: `feed` after every target decode, then
    `step` (draft + verify) and `keep` (accept, roll back the rest)."""

    def __init__(self, model: native.Model, target: native.Context, n_draft: int, threads: int,
                 draft_vocab=None, header=None) -> None:
        """`draft_vocab`: draft from a subset of the vocabulary (draft_head.py): an int K (the K
        most frequent tokens, draft_head.frequency_ranked) or the ids themselves; None or 0 drafts
        from the whole vocabulary (so does a K at least the vocabulary's size). Verification always
        uses the whole vocabulary. `header`: the GGUF's header, if read already."""
        ext, reason = staging_api()
        if ext is None:
            raise ChatError(reason)
        if not model.mtp_loaded:
            raise ChatError("the model was loaded without its MTP block")
        if not 1 <= n_draft <= target.n_rollback:
            raise ChatError(f"{n_draft} draft tokens need {n_draft} recurrent-state snapshots; "
                            f"the context keeps {target.n_rollback}")
        self._ext = ext
        self.n_draft = n_draft
        self._target = target
        self._n_embd = model.n_embd
        self._n_vocab = model.n_vocab
        self._ctx = native.Context(model, target.n_ctx, threads, target.n_batch, mtp=True)
        # The target gives a hidden row for every token it decodes (not only those with logits);
        # the MTP context only for its output rows (the drafts).
        ext.llama_set_embeddings_nextn(target.ptr, True, False)
        ext.llama_set_embeddings_nextn(self._ctx.ptr, True, True)
        self._head = None
        if np.ndim(draft_vocab) == 0 and not 0 < int(draft_vocab or 0) < model.n_vocab:
            draft_vocab = None
        if draft_vocab is not None:
            from .draft_head import SubsetHead, frequency_ranked

            ids = frequency_ranked(model, int(draft_vocab)) if np.ndim(draft_vocab) == 0 else draft_vocab
            try:
                self._head = SubsetHead(model.path, ids, threads, header)
            except ChatError:
                self._ctx.close()
                raise
            # A draft then asks for no logits: its hidden row is read for every token instead.
            ext.llama_set_embeddings_nextn(self._ctx.ptr, True, False)
        self._batch = L.llama_batch_ext_init(self._ctx.ptr)
        self._pos = (L.llama_pos * 1)()
        self._pending = np.zeros(self._n_embd, np.float32)  # target hidden state of the last token held
        self._rows = np.zeros((0, self._n_embd), np.float32)  # target hidden rows of the last decode
        self._rows_pos = 0
        self.drafted = 0
        self.accepted = 0

    # --- keeping the MTP context in step with the target ----------------------------------------

    def feed(self, tokens: list[int], pos: int, observe: int = 0) -> np.ndarray | None:
        """The target has just decoded `tokens` at `pos`: evaluate them in the MTP context, token k
        with the target's hidden state of token k-1 (the first with the pending one).

        `observe`: also return what the head would have drafted after each of the last `observe`
        tokens (at most SubsetHead.MANY) — the token its row predicts next, as a draft step's first
        draft is — for the caller to hold against the target's own choice there. The MTP context
        gives those rows anyway (a draft vocabulary reads every token's); only the draft
        vocabulary's output rows are computed, once for all of them. None without a draft
        vocabulary (the whole vocabulary's drafts ask the MTP context for logits)."""
        n = len(tokens)
        ptr = self._ext.llama_get_embeddings_nextn(self._target.ptr)
        if not ptr:
            raise ChatError("llama.cpp returned no hidden state for the MTP head")
        rows = np.ctypeslib.as_array(ptr, shape=(n, self._n_embd)).copy()
        self._trim(pos)
        self._clear_batch()
        for k, token in enumerate(tokens):
            self._add(token, pos + k, self._pending if k == 0 else rows[k - 1], output=False)
        self._process()
        self._rows, self._rows_pos = rows, pos
        self._pending = rows[-1].copy()
        looked = min(observe, n, self._head.MANY if self._head is not None else 0)
        if looked <= 0:
            return None
        own = self._ext.llama_get_embeddings_nextn(self._ctx.ptr)
        if not own:
            return None
        return self._head.argmax_rows(np.ctypeslib.as_array(own, shape=(n, self._n_embd))[n - looked:])

    def note(self, n_tokens: int, pos: int) -> None:
        """The target has just decoded `n_tokens` tokens at `pos`, and the MTP context is not kept
        in step (plain decoding under `auto`: evaluating them there would cost time that only
        drafting repays). Only the pending hidden state is taken; the MTP context misses those
        positions, which M-RoPE allows (positions may jump forward). Drafts after a gap are
        somewhat less often right; the tokens stay the target's."""
        ptr = self._ext.llama_get_embeddings_nextn(self._target.ptr)
        if not ptr:
            raise ChatError("llama.cpp returned no hidden state for the MTP head")
        rows = np.ctypeslib.as_array(ptr, shape=(n_tokens, self._n_embd))
        self._trim(pos)
        self._pending = rows[-1].copy()
        self._rows, self._rows_pos = rows.copy() if n_tokens > 1 else rows[-1:].copy(), pos

    def skip(self, pos: int) -> None:
        """The target has evaluated cells without tokens (an image) up to position `pos`: the MTP
        head, which reads token embeddings, does not see them."""
        self.restore(pos, None)

    def keep(self, n_tokens: int) -> None:
        """Keep the first `n_tokens` positions of the state (some of the last decode at least):
        the target rolls back the rest of its last decode, the MTP context follows."""
        last_end = self._rows_pos + len(self._rows)
        if n_tokens == last_end:
            return
        if not self._rows_pos < n_tokens < last_end:
            raise ChatError(f"cannot roll back to {n_tokens} tokens: the last decode covered "
                            f"{self._rows_pos}..{last_end}")  # a bug of ours: never a native abort
        self._target.trim(n_tokens)
        self._trim(n_tokens)
        self._pending = self._rows[n_tokens - self._rows_pos - 1].copy()
        self._rows = self._rows[:n_tokens - self._rows_pos]

    def hidden_state(self) -> np.ndarray:
        """The pending hidden state: what the next draft starts from, saved with the model state."""
        return self._pending.copy()

    def restore(self, n_tokens: int, hidden: np.ndarray | None) -> None:
        """The target state was set to `n_tokens` tokens (a checkpoint, a loaded conversation):
        keep as many positions of the MTP context and take up the hidden state saved with it."""
        self._trim(n_tokens)
        self._rows = np.zeros((0, self._n_embd), np.float32)
        self._rows_pos = n_tokens
        self._pending = (np.zeros(self._n_embd, np.float32) if hidden is None
                         else np.asarray(hidden, np.float32).reshape(self._n_embd).copy())

    def clear(self) -> None:
        self._ctx.clear()
        self.restore(0, None)

    def trim(self, n_tokens: int) -> None:
        """The target was trimmed to `n_tokens` (a turn boundary read back after the prompt's last
        decode): the pending hidden state is that decode's row of the token before, while it has it."""
        row = n_tokens - self._rows_pos - 1
        hidden = self._rows[row] if 0 <= row < len(self._rows) else self._pending
        self.restore(n_tokens, hidden)

    def set_threads(self, threads: int) -> None:
        self._ctx.set_threads(threads)
        if self._head is not None:
            self._head.set_threads(threads)

    def get_state(self, flags: int) -> bytes:
        """What a checkpoint of the target keeps of the drafting side: the pending hidden state,
        and with a FULL checkpoint the MTP context's KV cache too (a PARTIAL one is only used while
        the live state holds its prefix, and the MTP context is trimmed along with the target)."""
        hidden = self._pending.astype(np.float32).tobytes()
        return hidden + (bytes(self._ctx.get_state(native.FULL)) if flags == native.FULL else b"")

    def state_size(self, flags: int) -> int:
        """The bytes `get_state(flags)` gives."""
        return 4 * self._n_embd + (self._ctx.state_size(native.FULL) if flags == native.FULL else 0)

    def set_state(self, data: bytes | None, flags: int) -> None:
        """Take up a checkpoint's drafting side (None: the checkpoint has none, e.g. saved with
        speculation off: the MTP context then starts empty and fills as decoding goes)."""
        size = 4 * self._n_embd
        hidden = None if not data else np.frombuffer(bytes(data[:size]), np.float32)
        if flags == native.FULL:
            if data and len(data) > size:
                self._ctx.set_state(bytearray(data[size:]), native.FULL)
            else:
                self._ctx.clear()
        self._rows = np.zeros((0, self._n_embd), np.float32)
        self._pending = np.zeros(self._n_embd, np.float32) if hidden is None else hidden.copy()

    # --- one speculative step -------------------------------------------------------------------

    def draft(self, last: int, pos: int, n: int) -> list[int]:
        """Up to `n` tokens the MTP head expects after `last` (to be evaluated at `pos`). With a
        draft vocabulary (draft_head.py), the MTP context evaluates each token without an output row
        (its graph's output layer multiplies no row) and gives the normed hidden row that layer would
        have multiplied, which the subset's rows multiply instead."""
        drafts: list[int] = []
        hidden = self._pending
        token = last
        subset = self._head is not None
        for i in range(n):
            self._clear_batch()
            self._add(token, pos + i, hidden, output=not subset)
            self._process()
            if not subset:
                token = int(np.argmax(self._ctx.logits(0)))
                drafts.append(token)
                if i + 1 == n:
                    break
            ptr = (self._ext.llama_get_embeddings_nextn(self._ctx.ptr) if subset
                   else self._ext.llama_get_embeddings_nextn_ith(self._ctx.ptr, 0))
            if not ptr:
                raise ChatError("llama.cpp returned no hidden state from the MTP head")
            hidden = np.ctypeslib.as_array(ptr, shape=(self._n_embd,)).copy()
            if subset:
                token = self._head.argmax(hidden)
                drafts.append(token)
        # The drafts are evaluated again by `feed` after the verify, with the target's hidden rows.
        self._trim(pos)
        return drafts

    def step(self, last: int, pos: int, sampler: native.Sampler, n_draft: int, is_eog,
             cells: int | None = None) -> tuple[list[int], list[int]]:
        """Draft, verify: (the tokens evaluated at `pos`, the tokens sampled from them). The
        sampled ones y_0..y_k follow the target's distribution; y_i == draft i+1 for i < k. Call
        `keep` next with how many evaluated tokens the reply keeps. `cells`: as for
        Context.decode (more than `pos` after an image)."""
        drafts = self.draft(last, pos, n_draft) if n_draft > 0 else []
        batch = [last] + drafts
        self._target.decode(batch, pos, cells=cells, logits_all=True)
        self.feed(batch, pos)
        sampled: list[int] = []
        for i in range(len(batch)):
            y = sampler.sample(self._target, i)
            sampled.append(y)
            if i == len(drafts) or y != drafts[i] or is_eog(y):
                break
        self.drafted += len(drafts)
        self.accepted += len(sampled) - 1
        return batch, sampled

    # --- internals ------------------------------------------------------------------------------

    def _trim(self, n_tokens: int) -> None:
        # A plain KV cache over the MTP layer: any suffix can be dropped.
        self._ctx.trim(n_tokens)

    def _clear_batch(self) -> None:
        L.llama_batch_ext_clear(self._batch)

    def _add(self, token: int, pos: int, hidden: np.ndarray, *, output: bool) -> None:
        idx = L.llama_batch_ext_add_token(self._batch, native.SEQ, token)
        if idx < 0:
            raise ChatError(f"llama.cpp refused token {token} in an MTP batch (code {idx})")
        self._pos[0] = pos
        row = L.llama_embd(hidden.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self._n_embd)
        if not (L.llama_batch_ext_set_pos(self._batch, idx, self._pos)
                and L.llama_batch_ext_set_embd_token(self._batch, idx, row)
                and L.llama_batch_ext_set_output_logits(self._batch, idx, output)):
            raise ChatError("llama.cpp refused a hidden state in an MTP batch")

    def _process(self) -> None:
        rc = L.llama_process(self._ctx.ptr, L.LLAMA_PROCESS_TYPE_DECODE, self._batch)
        if rc != 0:
            raise ChatError(f"the MTP head failed (llama_process code {rc}): "
                            f"{native.log.find('error', 'failed') or 'no reason given'}")

    def close(self) -> None:
        if self._batch:
            L.llama_batch_ext_free(self._batch)
            self._batch = None
        if self._head is not None:
            self._head.close()
            self._head = None
        self._ctx.close()


def open_speculator(model: native.Model, target: native.Context, n_draft: int,
                    threads: int, draft_vocab=None, header=None) -> tuple[Speculator | None, str | None]:
    """A Speculator, or None and the notice that says why decoding stays plain."""
    try:
        return Speculator(model, target, n_draft, threads, draft_vocab, header), None
    except ChatError as e:
        return None, f"speculative decoding off: {e}"


# --- what a drafting step costs on this machine ---------------------------------------------------

# The best acceptance upstream measured on real weights at 3 drafts (MTP.md): if drafting loses
# even there, it loses on every real conversation.
BEST_REAL_ACCEPTANCE = 0.85


def emitted(acceptance: float, n_draft: int) -> float:
    """Tokens a step of `n_draft` drafts emits on average when each draft is right with probability
    `acceptance`: the first wrong draft ends the step, and the verify always yields one token more
    (1 + a + a² + … + a^n)."""
    return sum(acceptance ** i for i in range(n_draft + 1))


@dataclass(frozen=True)
class StepCosts:
    """What a drafting step costs here, in plain steps: `step[n - 1]` is a whole step with n drafts
    (the drafts, the verify of n + 1 tokens in one decode with logits for each, the MTP head fed
    them, the rows sampled) whose first draft was wrong, so that the rest is rolled back;
    `kept[n - 1]` the same step with every draft right (nothing rolled back: cheaper); both against
    a plain step (one token decoded and sampled), timed as decoding runs them. Ratios, not seconds:
    a machine busier than when they were measured slows both alike. `plain_s`: the plain step's
    seconds then (a record)."""

    step: tuple[float, ...]
    kept: tuple[float, ...] | None = None
    plain_s: float = 0.0

    @property
    def max_draft(self) -> int:
        return len(self.step)

    def cost(self, n_draft: int, acceptance: float) -> float:
        """A step of `n_draft` drafts, on average: all kept with probability a^n, else a roll-back."""
        whole = acceptance ** n_draft
        kept = self.kept[n_draft - 1] if self.kept else self.step[n_draft - 1]
        return whole * kept + (1 - whole) * self.step[n_draft - 1]

    def speedup(self, n_draft: int, acceptance: float) -> float:
        """Decode speed with `n_draft` drafts a step over plain decoding (n_draft 0: plain)."""
        return 1.0 if n_draft == 0 else emitted(acceptance, n_draft) / self.cost(n_draft, acceptance)

    def best(self, acceptance: float, limit: int | None = None) -> tuple[int, float]:
        """(n, speedup): the fastest number of drafts a step, at most `limit` (0: plain decoding;
        a tie goes to fewer)."""
        top = self.max_draft if limit is None else max(0, min(limit, self.max_draft))
        return max(((n, self.speedup(n, acceptance)) for n in range(top + 1)), key=lambda c: c[1])


class StepClock:
    """The step costs `auto` decides by (StepCosts), learnt from the steps decoding makes.

    They were once timed at load: rounds of a plain step and of steps of 1..N drafts, rolled back and
    kept whole, after a short prompt — 8.9 s more than a plain load, on a first load of a 4B model on
    a 2-core machine (docs/benchmarks.md), where a second was the budget. Real steps measure the
    same thing for nothing: a plain step is a plain step whether it was meant as a measurement or
    not, and a probe that drafts decodes too. So the clock keeps the latest WINDOW timings of each
    step shape (plain; n drafts, rolled back or kept whole) and gives the ratio of their medians to
    the plain step's; a shape's first timing is dropped (its graph is built then). Draft counts not
    timed yet lie on the line between timed ones, or beyond the last grow as the two highest timed
    counts do (beyond a single one, by LATER_DRAFT of what its drafts added: a first draft also pays
    the step's fixed costs); before any drafting step and the plain step are timed, one draft counts
    PRIOR plain steps (the machines measured: 1.1-1.7 at 2 threads, 2.7 on the AMD EPYC at 0.8B with
    the whole vocabulary). Once the plain step and draft count m have ENOUGH timings each, the costs
    of 1..m are handed to `learned` (to be remembered for the next load), again each time m grows and
    once when the plain step's window is full.

    `known` (costs remembered from an earlier session) stand for the draft counts they cover; the
    clock learns only the others."""

    WINDOW = 9
    ENOUGH = 3
    PRIOR = 1.5
    LATER_DRAFT = 0.5  # measured on this Xeon at 0.8B: 1.51, 1.80, 2.09 (the second draft added 0.57 of the first)
    # A step of n drafts checks n + 1 tokens in one pass and runs the head n times: it cannot cost
    # STALL (n + 1) plain steps. Such a timing is a stall and is not kept: on a machine shared with a
    # busy program, costs of 1,000 plain steps were learnt and remembered, and drafting was off for good.
    STALL = 4.0

    def __init__(self, max_draft: int, known: StepCosts | None = None,
                 learned: Callable[[StepCosts], None] | None = None) -> None:
        self.max_draft = max_draft
        self.known = known
        self._learned = learned
        self._times: dict[tuple[int, bool], deque] = {}
        self._seen: set[tuple[int, bool]] = set()
        self._handed = known.max_draft if known else 0
        self._full = False
        self._costs: StepCosts | None = None

    def add(self, n_draft: int, whole: bool, seconds: float) -> None:
        """A step of `n_draft` drafts (0: plain) took `seconds`; `whole`: every draft was kept."""
        shape = (n_draft, bool(whole) and n_draft > 0)
        if shape not in self._seen:
            self._seen.add(shape)
            return
        plain = self._times.get((0, False))
        if plain and len(plain) >= self.ENOUGH and seconds > self.STALL * (n_draft + 1) * median(plain):
            return  # a stall (another program had the cores), not what the step costs
        self._times.setdefault(shape, deque(maxlen=self.WINDOW)).append(seconds)
        self._costs = None
        self._hand_on()

    def count(self, n_draft: int) -> int:
        """Timings kept of steps of `n_draft` drafts (either kind)."""
        return sum(len(self._times.get((n_draft, whole), ())) for whole in (False, True))

    def needs_plain(self) -> bool:
        """Whether a plain step's timing is still wanted: the costs have draft counts to learn and
        the plain step, what they are measured against, has fewer than ENOUGH timings."""
        return (self.known is None or self.known.max_draft < self.max_draft) and self.count(0) < self.ENOUGH

    def costs(self) -> StepCosts:
        if self._costs is None:
            self._costs = self._compute()
        return self._costs

    def _compute(self) -> StepCosts:
        known = self.known
        plain = self._times.get((0, False))
        plain_s = median(plain) if plain else (known.plain_s if known else 0.0)
        timed: dict[int, tuple[float, float]] = {}  # draft count: (rolled back, kept whole) in plain steps
        for n in range(1, self.max_draft + 1):
            if known and n <= known.max_draft:
                timed[n] = (known.step[n - 1], known.kept[n - 1] if known.kept else known.step[n - 1])
                continue
            rolled, whole = self._times.get((n, False)), self._times.get((n, True))
            if plain and (rolled or whole):
                timed[n] = (median(rolled or whole) / plain_s, median(whole or rolled) / plain_s)
        step, kept = self._rows(timed)
        # A count timed fewer than ENOUGH times costs no more than if it were not timed yet: one slow
        # timing (a step on a busy machine) would otherwise keep it from ever being tried again.
        # Measured: a single timing of three drafts at 2.35 plain steps (three timings gave 2.09)
        # kept the rest of a reply at two.
        sure = {n: v for n, v in timed.items() if (known and n <= known.max_draft) or self.count(n) >= self.ENOUGH}
        if len(sure) < len(timed):
            guess_step, guess_kept = self._rows(sure)
            step = [min(a, b) for a, b in zip(step, guess_step)]
            kept = [min(a, b) for a, b in zip(kept, guess_kept)]
        return StepCosts(step=tuple(round(x, 4) for x in step), kept=tuple(round(x, 4) for x in kept),
                         plain_s=round(plain_s, 6))

    def _rows(self, timed: dict[int, tuple[float, float]]) -> tuple[list[float], list[float]]:
        """(step, kept) for every draft count, from those `timed` (rolled back, kept whole)."""
        step: list[float] = []
        kept: list[float] = []
        for n in range(1, self.max_draft + 1):
            if n in timed:
                step.append(timed[n][0])
                kept.append(timed[n][1])
                continue
            above = next((m for m in range(n + 1, self.max_draft + 1) if m in timed), None)
            below = sorted(m for m in timed if m < n)
            for i, row in enumerate((step, kept)):
                last = row[-1] if row else 1.0  # (no draft: a plain step)
                if above is not None:  # between two timed counts: on the line joining them
                    row.append(last + (timed[above][i] - last) / (above - n + 1))
                elif not row:
                    row.append(self.PRIOR)
                elif len(below) >= 2:  # beyond them: as the two highest timed counts grow (never shrinking)
                    a, b = below[-2], below[-1]
                    row.append(last + max((timed[b][i] - timed[a][i]) / (b - a), 0.0))
                else:
                    # Beyond one timed count (or the prior): a further draft adds LATER_DRAFT of what each
                    # draft of it added on average. The first draft carries the drafting step's fixed
                    # costs (the head's pass, the roll-back snapshot), which later drafts do not repeat;
                    # taken whole, 0.8B at 80% acceptance (1.66 plain steps for one draft) stayed at one
                    # draft, 1.08x, where three (2.24) give 1.32x. An optimistic guess is timed and put
                    # right within a few steps; a pessimistic one is never tried.
                    m = below[-1] if below else 1
                    first = timed[m][i] if below else row[0]  # (nothing timed: the prior's one draft)
                    row.append(last + max((first - 1.0) / m * self.LATER_DRAFT, 0.0))
        return step, kept

    def _hand_on(self) -> None:
        if self._learned is None or len(self._times.get((0, False), ())) < self.ENOUGH:
            return
        m = max((n for n in range(self._handed + 1, self.max_draft + 1) if self.count(n) >= self.ENOUGH), default=0)
        # Again, once, when the plain step's window is full: its median is then the steadiest.
        full = not self._full and len(self._times[0, False]) == self.WINDOW and self._handed > (
            self.known.max_draft if self.known else 0)
        if m > self._handed or full:
            self._handed = max(m, self._handed)
            self._full = self._full or full
            c = self.costs()
            self._learned(StepCosts(step=c.step[:self._handed], kept=c.kept[:self._handed], plain_s=c.plain_s))


DRAFT_COSTS = "draft-costs.json"
DRAFT_ACCEPTANCE = "draft-acceptance.json"


def recall_acceptance(key: str) -> tuple[float, float] | None:
    """(right, tries) of the drafts remembered for `key` (a model file and draft vocabulary: Decoder
    makes it), or None."""
    known = remembered.recall(DRAFT_ACCEPTANCE, key)
    try:
        right, tries = float(known["right"]), float(known["tries"])
    except (KeyError, TypeError, ValueError):
        return None
    return (right, tries) if 0 <= right <= tries else None


def remember_acceptance(key: str, right: float, tries: float) -> None:
    remembered.remember(DRAFT_ACCEPTANCE, key, {"right": round(right, 2), "tries": round(tries, 2),
                                                "when": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def recall_costs(key: str) -> StepCosts | None:
    """The step costs remembered for `key` (this CPU, llama.cpp build, model file, threads and draft
    count: Decoder makes it), or None (never learnt here, or a file from elsewhere)."""
    known = remembered.recall(DRAFT_COSTS, key)
    if known is None:
        return None
    try:
        step = tuple(float(x) for x in known["step"])
        kept = known.get("kept")
        kept = None if kept is None else tuple(float(x) for x in kept)
        if not step or (kept is not None and len(kept) != len(step)):
            return None
        return StepCosts(step=step, kept=kept, plain_s=float(known.get("plain_s", 0)))
    except (KeyError, TypeError, ValueError):
        return None


def remember_costs(key: str, costs: StepCosts) -> None:
    remembered.remember(DRAFT_COSTS, key, {"step": list(costs.step), "kept": list(costs.kept) if costs.kept else None,
                                           "plain_s": costs.plain_s,
                                           "when": datetime.now(timezone.utc).isoformat(timespec="seconds")})


# Drafting is kept at load only if it would be this much faster at the best real acceptance.
MIN_EXPECTED_SPEEDUP = 1.05


def drafting_verdict(costs: StepCosts) -> str | None:
    """None when drafting can pay with these costs, else the notice that says why it is off."""
    n, speedup = costs.best(BEST_REAL_ACCEPTANCE)
    if n and speedup >= MIN_EXPECTED_SPEEDUP:
        return None
    n_max = costs.max_draft
    return (f"speculative decoding off: on this machine a step that drafts {n_max} token{'s' if n_max > 1 else ''} "
            f"and checks {n_max + 1} in one pass takes {costs.step[-1]:.1f}x one token's time, so even at "
            f"{BEST_REAL_ACCEPTANCE:.0%} of drafts right it would decode at "
            f"{max(costs.speedup(k, BEST_REAL_ACCEPTANCE) for k in range(1, n_max + 1)):.2f}x plain speed "
            f"(measured once on this machine; speculative=mtp, or --mtp, drafts anyway)")


# A model state with its drafting side: target bytes, drafting bytes, their length and this mark.
_STATE_MARK = b"QWEN35-MTP-STATE"


_STATE_TAIL = 8 + len(_STATE_MARK)


def join_state(target: bytes | bytearray, drafting: bytes) -> bytearray:
    out = bytearray(target)
    out += drafting
    out += struct.pack("<Q", len(drafting)) + _STATE_MARK
    return out


def split_state(data: bytes | bytearray) -> tuple[bytes | bytearray, bytes | None]:
    """(the target's state, the drafting side or None) of a state `join_state` may have written."""
    tail = len(_STATE_MARK) + 8
    if len(data) < tail or bytes(data[-len(_STATE_MARK):]) != _STATE_MARK:
        return data, None
    (n,) = struct.unpack("<Q", bytes(data[-tail:-len(_STATE_MARK)]))
    end = len(data) - tail
    if n > end:
        return data, None
    return data[:end - n], bytes(data[end - n:end])


class DraftedState:
    """The target context and its Speculator as one model state, for the state cache: every
    checkpoint, restore and trim of the target carries the drafting side along, so a conversation
    taken up from a checkpoint or a saved file drafts as well as if it had never stopped.
    `before`: called first by each of them (Decoder.catch_up: the drafting side may lag the target
    by a prompt's last decode)."""

    def __init__(self, target: native.Context, speculator: Speculator,
                 before: Callable[[], None] = lambda: None) -> None:
        self._target = target
        self._spec = speculator
        self._before = before

    def get_state(self, flags: int) -> bytearray:
        self._before()
        return join_state(self._target.get_state(flags), self._spec.get_state(flags))

    def state_size(self, flags: int) -> int:
        self._before()
        return self._target.state_size(flags) + self._spec.state_size(flags) + _STATE_TAIL

    def set_state(self, data: bytes | bytearray, flags: int) -> None:
        self._before()
        target, drafting = split_state(data)
        self._target.set_state(target if isinstance(target, bytearray) else bytes(target), flags)
        self._spec.set_state(drafting, flags)

    def trim(self, pos: int) -> None:
        self._before()
        self._target.trim(pos)
        self._spec.trim(pos)

    def clear(self) -> None:
        self._before()
        self._target.clear()
        self._spec.clear()


# --- when drafting pays ---------------------------------------------------------------------------

OFF, MTP, AUTO = "off", "mtp", "auto"
MODES = (AUTO, MTP, OFF)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ChatError(f"speculative must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


class Acceptance:
    """How often the MTP head's next draft is right, as decoding goes. A step's drafts are looked at
    until the first wrong one, so a step with k of n drafts right shows k right of k + 1 tries (n of
    n when all are right). Acceptance depends on the text being written, so what was seen fades
    with every token since (DECAY a token, drafted or not: about the last 30 tokens count), and a
    prior stays beside it. With nothing known of this head, PRIOR_TRIES tries at PRIOR: real heads
    are right 60-85% of the time (MTP.md); a head that is never right shows it in a try or two; and
    after a long stretch of plain decoding a single try speaks for the text of now. A head seen
    before (`known`: right and tries of earlier sessions with this model file, remembered as the step
    costs are) starts from its own rate instead, weighed as KNOWN_TRIES tries at first: one wrong first draft
    of a head right 80% of the time is bad luck, not news, and it no longer sends decoding plain for
    a probe interval (the largest loss `auto` had on a head that pays: simulated on the step costs
    learnt at 4B, at 80%, 0.88-0.94x always drafting over a reply of 128 tokens)."""

    PRIOR = 0.6
    PRIOR_TRIES = 1.0
    DECAY = 0.97
    KNOWN_TRIES = 8.0
    KNOWN_ENOUGH = 32  # tries behind a remembered rate before it stands for the head
    KNOWN_FADE = 0.95  # its weight, a try: 1 of the 8 left after 40 tries
    TEXT_WEIGHT = 0.5  # a would-be draft after a prompt's token, against a draft's try (observe_text)
    # Prompt tokens looked at, at most, in a session (two prompts' ends): each look costs the prompt's
    # last decode 8 rows of the output layer (measured at 4B dimensions on 2 cores: +0.16 s to a
    # 42-token prompt's 1.50 s), and a head seldom right would otherwise be looked at on every prompt.
    TEXT_ENOUGH = 16

    def __init__(self, known: tuple[float, float] | None = None) -> None:
        self.right = 0.0
        self.tries = 0.0
        self.ever_right = 0
        self.total_right = 0  # all of this session's, unfaded: what is remembered
        self.total_tries = 0
        self.text_looked = 0  # prompt tokens after which the head's would-be draft was looked at
        self.known = known if known is not None and known[1] >= self.KNOWN_ENOUGH else None
        self.prior, self.prior_tries = ((self.known[0] / self.known[1], self.KNOWN_TRIES) if self.known
                                        else (self.PRIOR, self.PRIOR_TRIES))

    @property
    def rate(self) -> float:
        # A remembered rate weighs less with every try this session sees (down to PRIOR_TRIES, the
        # unknown head's weight throughout): the text of now may not be the text it was learnt on,
        # and a head remembered as seldom right must still be found right again by its probes.
        weight = max(self.prior_tries * self.KNOWN_FADE ** self.total_tries, self.PRIOR_TRIES)
        return (self.right + self.prior * weight) / (self.tries + weight)

    @property
    def known_right(self) -> bool:
        """Whether this head was seen right in earlier sessions."""
        return self.known is not None and self.known[0] > 0

    def observe(self, drafted: int, right: int) -> None:
        for hit in [1] * right + ([0] if right < drafted else []):
            self.right = self.right * self.DECAY + hit
            self.tries = self.tries * self.DECAY + 1
        self.ever_right += right
        self.total_right += right
        self.total_tries += right + (right < drafted)

    def observe_text(self, right: int, looked: int) -> None:
        """After `looked` tokens of a prompt the head's would-be draft was the model's own choice
        `right` times: a draft's test, at positions inside text the model read rather than wrote,
        which it predicts less well than its own (a head right 80% of the time in its replies was
        right after 4 of a prompt's last 8 tokens, on the 4B controlled file). So the prompt can
        show a head that is never right (none of them: it counts, TEXT_WEIGHT of a try each, and
        decoding starts plainly) or one right more often than the prior says (it counts, and the
        head drafts as wide as pays from its first step); a share below the prior says little, and
        only widens the first steps by the drafts found right."""
        if right == 0 or right / looked > self.prior:
            self.right += self.TEXT_WEIGHT * right
            self.tries += self.TEXT_WEIGHT * looked
        self.ever_right += right
        self.text_looked += looked

    def age(self, tokens: int = 1) -> None:
        """`tokens` were decoded plainly: what was seen before counts less."""
        fade = self.DECAY ** tokens
        self.right *= fade
        self.tries *= fade


class DraftPolicy:
    """How many drafts the next step makes (0: decode plainly). `mtp`: always `max_draft`; `off`:
    never; `auto`: as many as decode fastest by the machine's step costs (StepCosts, learnt from the
    steps themselves by a StepClock and remembered) at the acceptance seen so far (Acceptance) — and none when plain decoding is
    faster, as it is when the head is seldom right or a step costs too much here.

    Two rules keep `auto` from losing where drafting does not pay, from the first reply on. It
    starts small: no more drafts a step than one plus the drafts ever found right, so a head that is
    never right costs one single-draft step or two, not a reply of wide ones. And while it decodes
    plainly it cannot see the head's acceptance, so it probes with PROBE_STEPS single-draft
    steps after FIRST_INTERVAL plain tokens (REPROBE when a stretch of drafting with a head that has
    been right just ended), then after twice as many each time plain decoding stays
    the better way (up to MAX_INTERVAL): its probes cost a small and shrinking share. Everything carries over from
    reply to reply; what it saw of the head is remembered for the next load (Acceptance)."""

    FIRST_INTERVAL = 32
    REPROBE = 8  # plain tokens before the probe after a stretch of drafting ends
    MAX_INTERVAL = 4096
    PROBE_STEPS = 2  # single-draft steps a probe takes: one wrong draft of a good head is not the end
    # While the plain step is not timed yet (StepClock.ENOUGH), one step in this many is plain, so that
    # a head good from the start does not leave the costs a guess.
    PLAIN_EVERY = 5
    MARGIN = 1.03  # drafting must beat plain decoding by this much: no switching on a hair
    STAY = 1.01  # and goes on while it beats it by this much
    REMEMBER_FIRST = 32

    def __init__(self, mode: str, max_draft: int = 2, costs: StepCosts | None = None,
                 clock: StepClock | None = None, known_acceptance: tuple[float, float] | None = None,
                 remember_acceptance: Callable[[float, float], None] | None = None) -> None:
        """`known_acceptance`: (right, tries) remembered of this head (Acceptance); what this
        session sees is handed to `remember_acceptance` (right, tries: the remembered ones at half
        weight, and this session's), once at REMEMBER_FIRST tries and again each time they double."""
        self.mode = check_mode(mode)
        self.max_draft = max_draft
        # `auto` decides by the clock's costs: given ones (remembered, or hand-made in the tests)
        # stand for the draft counts they cover, the rest are learnt from the steps as they are timed.
        self.clock = clock if clock is not None else (StepClock(max_draft, known=costs) if mode == AUTO else None)
        self.acceptance = Acceptance(known_acceptance)
        self._known_acceptance = known_acceptance
        self._remember = remember_acceptance
        self._remember_at = self.REMEMBER_FIRST
        self._interval = self.FIRST_INTERVAL
        self._since = 0  # plain tokens since the last drafting step
        self._drafting = 0  # drafting steps since the last plain one
        self._n = self._choose() if mode == AUTO else 0
        # Single-draft steps left in a probe. When the prior alone does not make drafting pay here, the
        # first step is a probe anyway: a good head then drafts from its first tokens instead of
        # after FIRST_INTERVAL plain ones, and a bad one costs one single-draft step.
        # A head remembered as seldom right is not probed at once: it waits a probe interval.
        self._probe = 1 if mode == AUTO and self._n == 0 and self.acceptance.known is None else 0
        self._probe_right = 0  # drafts found right in the current probe
        self._first_probe = bool(self._probe)

    @property
    def costs(self) -> StepCosts | None:
        return self.clock.costs() if self.clock is not None else None

    def n_draft(self) -> int:
        """Drafts for the next step (0: a plain step)."""
        if self.mode != AUTO:
            return self.max_draft if self.mode == MTP else 0
        if self._n == 0 and not self._probe and self._since >= self._interval:
            self._probe, self._probe_right = self.PROBE_STEPS, 0
        n = 1 if self._probe else self._n
        if n and self._drafting >= self.PLAIN_EVERY - 1 and self.clock.needs_plain():
            return 0  # a plain step, to be timed
        return n

    def drafts(self) -> bool:
        """Whether the next step drafts (and so the MTP head must be kept in step)."""
        return self.n_draft() > 0

    def wants_text(self) -> bool:
        """Whether what the head would draft after a prompt's last tokens is worth looking at
        (observe_text): under `auto`, while this head is neither remembered nor tried enough here,
        on a session's first prompts (Acceptance.TEXT_ENOUGH)."""
        a = self.acceptance
        return (self.mode == AUTO and a.known is None and a.total_tries < self.REMEMBER_FIRST
                and a.text_looked < a.TEXT_ENOUGH)

    def observe_text(self, right: int, looked: int) -> None:
        """After a prompt's last `looked` tokens the head's would-be draft was the model's own
        choice `right` times (Decoder._track). Before its first draft a head unknown here was
        judged by the prior alone: one wrong first draft of a head right 80% of the time sent a
        first load plain for FIRST_INTERVAL tokens (one load in five), and a head never right cost
        a single-draft step or two on every first load. The prompt decides the first steps
        instead: drafting, as many as the evidence allows, or plain decoding until the next probe."""
        if self.mode != AUTO or looked <= 0:
            return
        self.acceptance.observe_text(right, looked)
        if self._probe and not self._first_probe:
            return  # (a probe under way ends as it was meant to)
        self._probe, self._first_probe = 0, False
        drafting = self._n > 0 and self.acceptance.total_tries > 0  # (before any step: the prior's choice only)
        self._n = self._choose(drafting=drafting)
        if drafting and self._n == 0:
            self._since = 0

    def record(self, drafted: int, right: int, seconds: float | None = None) -> None:
        """A drafting step made `drafted` drafts, of which the first `right` were right, in `seconds`
        (None: not timed, as when other programs had cores taken from it)."""
        if seconds is not None and self.clock is not None:
            self.clock.add(drafted, right == drafted, seconds)
        self.acceptance.observe(drafted, right)
        if self._remember is not None and self.acceptance.total_tries >= self._remember_at:
            self._remember_at *= 2
            old_right, old_tries = self._known_acceptance or (0.0, 0.0)
            self._remember(old_right / 2 + self.acceptance.total_right, old_tries / 2 + self.acceptance.total_tries)
        if self.mode != AUTO:
            return
        self._since = 0
        self._drafting += 1
        if self._probe:
            self._probe_right += right
            self._probe -= 1
            if self._probe:
                return
            self._n = self._choose()
            # The next probe as soon again when this one drafted or found the head right where drafting
            # can pay: two single drafts are a noisy sample (at 75% one of them is wrong nearly half
            # the time), and doubling on such a probe left a head that pays decoding plainly for
            # hundreds of tokens. A head never right, or costs that no head can beat, back off.
            if self._n or self._first_probe or (self._probe_right and self._can_pay()):
                self._interval = self.FIRST_INTERVAL
            else:
                self._interval = min(2 * self._interval, self.MAX_INTERVAL)
            self._first_probe = False
            return
        drafting, self._n = self._n > 0, self._choose(drafting=self._n > 0)
        if drafting and self._n == 0 and (self.acceptance.ever_right or self.acceptance.known_right):
            # A head that has been right leaves drafting on a bad patch of text more often than for
            # good (two wrong drafts in a row happen at 70%): the first probe comes soon.
            self._interval = self.REPROBE

    def plain_step(self, seconds: float | None = None) -> None:
        if seconds is not None and self.clock is not None:
            self.clock.add(0, False, seconds)
        self._since += 1
        self._drafting = 0
        self.acceptance.age()

    def _can_pay(self) -> bool:
        """Whether drafting would pay with these costs at the best acceptance real heads reach."""
        return self.clock.costs().best(BEST_REAL_ACCEPTANCE)[1] >= self.MARGIN

    def _choose(self, drafting: bool = False) -> int:
        """Drafts for the coming steps: to start drafting it must beat plain decoding by MARGIN; once
        drafting it goes on while it is STAY faster (an estimate near the break-even otherwise flips
        it to plain decoding for a probe interval at every unlucky step)."""
        # No more drafts than one plus those ever found right, unless the head is known from before.
        limit = self.max_draft if self.acceptance.known_right else min(self.max_draft, 1 + self.acceptance.ever_right)
        n, speedup = self.clock.costs().best(self.acceptance.rate, limit)
        return n if speedup >= (self.STAY if drafting else self.MARGIN) else 0
