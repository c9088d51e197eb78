"""The decoder: one loaded model, its context and its checkpoints, as a conversation drives them.

Opening it decides everything that depends on the machine before a byte is loaded: the memory the
model will take at this context (memory.py, with AMX's copy of the weights where AMX runs), whether
it fits, whether the MTP head is loaded (and, with `auto`, kept unless this machine's step costs —
learnt from earlier decoding and remembered — say drafting cannot pay: speculative.drafting_verdict),
whether the read-back snapshots fit. Then it
evaluates cells — text tokens, and images' stand-ins, which it hands to whoever laid them out
(`images`) — in batches, keeping the state cache (state_cache.py) and the MTP head in step.

It knows tokens and positions, never messages: the conversation (ChatSession) decides what to
evaluate and where its checkpoints go.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from ...system import performance_cores
from . import cpu, native
from .adaptive_threads import ThreadGovernor
from .errors import ChatError
from .memory import check_fits, estimate, recurrent_state_bytes
from .modelfile import QWEN35_ARCHS, ModelFile, read_model_file
from .repack import AMX_IN_USE, cpu_features
from . import remembered
from .speculative import (AUTO, DRAFT_VOCAB, MTP, OFF, DraftedState, DraftPolicy, Speculator, StepClock, StepCosts,
                          check_mode, drafting_verdict, mtp_block_count, open_speculator, recall_acceptance,
                          recall_costs, remember_acceptance, remember_costs, staging_api)
from .state_cache import READ_BACK, StateCache, position
from .vision import LLAMA_IMAGE_MAX_TOKENS

N_BATCH = 512  # prompt tokens per llama_decode; also llama.cpp's physical batch
# Checkpoints a chat keeps by default (a prefix, a turn boundary and a prompt end per turn; see
# state_cache.py), in units of one recurrent state.
N_CHECKPOINTS = 4
MAX_DRAFT_TOKENS = 8  # each draft token costs one more recurrent-state snapshot in the context
# A prompt's last tokens after which `auto`, while it does not know the MTP head yet, holds the head's
# would-be drafts against the model's own choice (DraftPolicy.observe_text): their logits come with the
# prompt's last decode (8 rows of the output layer) and the draft vocabulary's rows take them in one pass.
TEXT_LOOK = 8

# Evaluates the image whose stand-ins start at a cell: (first cell, context, cache) → cells it takes.
ImageEvaluator = Callable[[int, native.Context, StateCache], int]


class Verified:
    """A speculative step: the tokens evaluated at `pos` ([last token, drafts…]) and those sampled
    from them; `index`: the sampled token being looked at, whose predecessors are kept."""

    def __init__(self, batch: list[int], sampled: list[int], pos: int) -> None:
        self.batch, self.sampled, self.pos, self.index = batch, sampled, pos, -1

    @property
    def kept(self) -> int:
        return self.index + 1

    def more(self) -> bool:
        return self.index + 1 < len(self.sampled)

    def next(self) -> int:
        self.index += 1
        return self.sampled[self.index]


class Decoder:
    """A GGUF loaded for a conversation: `model`, `ctx`, the MTP head (`spec`, None when decoding
    plainly), the checkpoints (`cache`), the drafting `policy` and the thread `governor`.

    `stop` is set to interrupt an evaluation between batches (a reply, a prefill); `images` is
    given the image cells it meets. `warnings` collects what the user should be told (drafting
    off, and why)."""

    def __init__(self, mf: ModelFile, n_ctx: int, threads: int | None = None, *, cache_ram: int | None = None,
                 force: bool = False, adapt_threads: bool = True, mmproj: Path | None = None,
                 image_max_tokens: int | None = None, speculative: str = OFF, draft_tokens: int = 3,
                 draft_vocab: int = DRAFT_VOCAB) -> None:
        self.model_file = mf
        self.warnings: list[str] = []
        # What `auto` chose that is no fault (decoding plainly where drafting cannot pay here, or
        # where the head does not fit): said with --verbose and in a server's log, not as a warning
        # at every load of the default.
        self.notes: list[str] = []
        self.threads = threads or performance_cores()
        self.stop = threading.Event()
        self.images: ImageEvaluator | None = None
        drafting = drafting_possible(mf, speculative, draft_tokens)
        said = self.notes if speculative == AUTO else self.warnings
        if drafting and staging_api()[0] is None:  # checked before loading anything for it
            said.append(f"speculative decoding off: {staging_api()[1]}")
            drafting = False
        recurrent = max(recurrent_state_bytes(mf), 1)
        cache_bytes = cache_ram if cache_ram is not None else default_cache_bytes(mf, drafting)
        # (AMX, where it runs, holds a copy of the weights it takes: the estimate must know.)
        features = cpu_features() | ({AMX_IN_USE} if cpu.amx_decision(mf.path, probe=False).use_amx else set())
        sizes = dict(n_batch=N_BATCH, n_checkpoints=-(-cache_bytes // recurrent), threads=self.threads,
                     features=features)
        # The vision tower loads at the first image, but memory for it (and for an image as large as
        # the budget) must be there then: it is counted now.
        sizes.update(mmproj=read_model_file(mmproj) if mmproj is not None else None)
        budget = image_max_tokens or LLAMA_IMAGE_MAX_TOKENS
        self.draft_vocab = draft_vocab if 0 < draft_vocab < mf.n_tokens else 0  # 0: the whole vocabulary
        drafts = dict(draft_tokens=draft_tokens, draft_vocab=self.draft_vocab) if drafting else {}
        self.memory = estimate(mf, n_ctx, **sizes, image_max_tokens=budget, **drafts)
        problem = check_fits(mf, self.memory, **sizes, **drafts)
        if problem and drafting and speculative == AUTO:
            plain = estimate(mf, n_ctx, **sizes, image_max_tokens=budget)
            if not check_fits(mf, plain, **sizes):  # it fits without the MTP head: leave it out
                self.notes.append("speculative decoding off: the MTP head would not fit in memory")
                drafting, self.memory, problem = False, plain, None
        self.read_back = READ_BACK
        if problem and not drafting:
            lean = estimate(mf, n_ctx, **sizes, image_max_tokens=budget, read_back=0)
            if not check_fits(mf, lean, **sizes):  # it fits without the read-back snapshots: turn
                # boundaries near a prompt's end then end a decode (slower to the first token, not wrong)
                self.read_back, self.memory, problem = 0, lean, None
        if problem and not force:
            raise ChatError(problem)

        try:
            self.model = native.Model(str(mf.path), load_mtp=drafting, mapped=self.memory.mapped)
        except ChatError as e:
            if "unknown model architecture" in str(e):
                raise ChatError(f"{mf.path} is a '{mf.architecture}' model, an architecture the llama.cpp bundled "
                                f"with llama-cpp-python 0.3.36 cannot run") from None
            raise
        self.spec: Speculator | None = None
        self.ctx: native.Context | None = None
        self.clock: StepClock | None = None
        try:
            if drafting and speculative == AUTO:
                self.clock = self._step_clock(draft_tokens)
                drafting = self._drafting_can_pay()
            # Verifying a draft needs logits for each of its tokens and the recurrent-state
            # snapshots to roll back the rejected ones; a turn boundary near a prompt's end is read
            # back from them too (state_cache.py).
            self.ctx = native.Context(self.model, n_ctx, self.threads, N_BATCH,
                                      n_outputs=max(draft_tokens + 1, TEXT_LOOK) if drafting else 1,
                                      n_rollback=max(draft_tokens, self.read_back) if drafting else self.read_back)
            if drafting:
                self.spec, notice = open_speculator(self.model, self.ctx, draft_tokens, self.threads,
                                                    self.draft_vocab, header=mf)
                if notice:
                    said.append(notice)
        except ChatError:
            if self.ctx:
                self.ctx.close()
            self.model.close()
            raise
        if self.model.mtp_loaded and self.spec is None:  # decoding plainly after all: the MTP block's weights
            # stay loaded (loading the model again would cost more), its context and snapshots are gone
            # (what the process held before loading, as first estimated: its memory now holds the model)
            plain = estimate(mf, n_ctx, **sizes, image_max_tokens=budget, read_back=self.read_back,
                             process=self.memory.process)
            self.memory = replace(plain, weights=self.memory.weights, repacked=self.memory.repacked,
                                  weights_idle=self.memory.weights_idle)
        self.n_ctx = self.ctx.n_ctx
        self.draft_tokens = draft_tokens if self.spec else 0
        self.policy = self._policy(speculative if self.spec else OFF)
        # Between generated tokens, give cores back to other programs that take them (and take them
        # again when they are free): see adaptive_threads.py.
        self.governor = ThreadGovernor(self.threads, self._set_threads) if adapt_threads and self.threads > 1 \
            else None
        # A prompt's last decode, not yet in the MTP context (catch_up): (tokens, position, look).
        self._behind: tuple[list[int], int, int] | None = None
        # The state the cache checkpoints: the model's, and with speculation the MTP head's too.
        self.state = DraftedState(self.ctx, self.spec, before=self.catch_up) if self.spec else self.ctx
        self.cache = StateCache(self.state, cache_bytes)

    # --- evaluating -----------------------------------------------------------------------------

    def evaluate(self, tokens: list[int], *, logits: bool, last_batch: int = 1,
                 stop: Callable[[], bool] | None = None, step: int | None = None, prompt: bool = False) -> bool:
        """Feed cells (tokens, and images' stand-ins) in batches, the last one holding at least
        `last_batch` cells when they are text. Returns False if interrupted between batches (`stop`
        set, or `stop()` true); the state stays consistent either way (`cache.tokens` lists exactly
        what has been evaluated). `prompt`: these end a turn's prompt (what `auto` may judge a new
        MTP head by: DraftPolicy.observe_text); the MTP context takes in the prompt's last decode
        only when the decoder is next used (catch_up), so that the reply's first token does not wait
        for it."""
        self.catch_up()
        step = min(step or self.ctx.n_batch, self.ctx.n_batch)
        held = self.cache.tokens
        i = 0
        while i < len(tokens):
            if i and (self.stop.is_set() or stop is not None and stop()):
                return False
            if tokens[i] < 0:  # an image starts here
                n = self.images(tokens[i], self.ctx, self.cache)
                held.extend(tokens[i:i + n])
                if self.spec:
                    self.spec.skip(position(held))
                i += n
                continue
            end = min(i + step, len(tokens))
            if 0 < len(tokens) - end < last_batch:
                end = max(i + 1, len(tokens) - last_batch)
            end = next((j for j in range(i, end) if tokens[j] < 0), end)
            chunk = tokens[i:end]
            pos = position(held)
            last = logits and end == len(tokens)
            # A prompt's end (`prompt`: a turn's, not a generation step's, whose timing it would
            # spoil), while `auto` does not know the MTP head yet: the target's choice after each of
            # its last tokens, to hold the head's would-be drafts against (_track).
            look = min(TEXT_LOOK, len(chunk)) if prompt and last and self.spec and self.policy.drafts() \
                and self.policy.wants_text() else 0
            self.ctx.decode(chunk, pos, cells=len(held), logits_last=last, logits_tail=look)
            if self.spec and prompt and last:
                self._behind = (chunk, pos, look)
            elif self.spec:
                self._track(chunk, pos, look)
            held.extend(chunk)
            i = end
        return True

    def reuse(self, prompt: list[int], *, need_logits: bool = True) -> int:
        """Bring the model state to the longest prefix of `prompt` it can reach without evaluating
        anything; returns that prefix's length. With `need_logits`, at least one prompt token is
        left to evaluate (its logits start the reply)."""
        return self.cache.restore(prompt, len(prompt) - 1 if need_logits else len(prompt))

    def can_read_back(self, prompt: list[int], boundary: int) -> bool:
        """Whether the state at `boundary` can be read back from the snapshots of the decode that
        ends `prompt` (StateCache.snapshot_back): near enough the end, text from the token before
        it on, and a context that keeps them."""
        return len(prompt) - boundary <= min(self.ctx.n_rollback, self.read_back) and min(prompt[boundary - 1:]) >= 0

    def draft_step(self, token: int, sampler: native.Sampler, n_draft: int) -> Verified:
        """Evaluate `token` and the MTP head's `n_draft` drafts in one pass, sampling every row
        while the samples match the drafts (Speculator.step)."""
        self.catch_up()
        tokens = self.cache.tokens
        batch, sampled = self.spec.step(token, position(tokens), sampler, n_draft, self.model.is_eog,
                                        cells=len(tokens))
        return Verified(batch, sampled, position(tokens))

    def keep(self, verified: Verified | None) -> None:
        """The model keeps, of a speculative step, the tokens before the one being looked at (as
        plain decoding would hold them); the MTP head follows. Returns None (no step pending)."""
        if verified is not None:
            self.spec.keep(verified.pos + verified.kept)
            self.cache.tokens.extend(verified.batch[:verified.kept])
        return None

    def catch_up(self) -> None:
        """Bring the MTP context up to what the model evaluated: the prompt's last decode, which
        `evaluate` left to now. Its hidden states and logits stay the model's last outputs until the
        next decode, and every use of the decoder or of its state (DraftedState) calls this first:
        the MTP layer's share of the prompt (on the demo model a fifth of its work) comes after
        the first token instead of before it."""
        if self._behind is not None:
            tokens, pos, look = self._behind
            self._behind = None
            self._track(tokens, pos, look)

    def _track(self, tokens: list[int], pos: int, look: int = 0) -> None:
        """Keep the MTP head in step with what the model just evaluated: all of it while drafting,
        only the last hidden state while decoding plainly (see Speculator.note). `look`: the last
        `look` tokens had logits: show `auto` how many of the head's would-be drafts after them are
        the model's own choice there (DraftPolicy.observe_text)."""
        if self.policy.drafts():
            drafts = self.spec.feed(tokens, pos, observe=look)
            if drafts is not None:  # (the last outputs are those tokens', in order)
                chosen = [int(np.argmax(self.ctx.logits(i - len(drafts)))) for i in range(len(drafts))]
                self.policy.observe_text(int(np.sum(drafts == np.asarray(chosen))), len(drafts))
        else:
            self.spec.note(len(tokens), pos)

    # --- settings -------------------------------------------------------------------------------

    def set_threads(self, threads: int, *, adapt: bool = False) -> None:
        self._set_threads(threads)
        self.threads = threads
        self.governor = ThreadGovernor(threads, self._set_threads) if adapt and threads > 1 else None

    def _set_threads(self, threads: int) -> None:
        self.ctx.set_threads(threads)
        if self.spec:
            self.spec.set_threads(threads)

    def set_speculative(self, mode: str) -> None:
        check_mode(mode)
        if mode != OFF and self.spec is None:
            raise ChatError("this session decodes without an MTP head: open it with speculative='mtp'")
        if mode == AUTO and self.clock is None:
            self.clock = self._step_clock(self.spec.n_draft)
        self.policy = self._policy(mode)

    def _policy(self, mode: str) -> DraftPolicy:
        """The drafting policy, with what earlier sessions saw of this head's acceptance (recalled and
        handed on under a key of the model file and the draft vocabulary: it is the head's, whatever
        the machine)."""
        if self.spec is None:
            return DraftPolicy(mode, self.draft_tokens, clock=self.clock)
        key = self._file_key(f"draft vocabulary {self.draft_vocab}", "acceptance v1")
        return DraftPolicy(mode, self.draft_tokens, clock=self.clock, known_acceptance=recall_acceptance(key),
                           remember_acceptance=lambda right, tries: remember_acceptance(key, right, tries))

    def _file_key(self, *parts: str) -> str:
        """A key of the model file and `parts`, whatever the machine."""
        return hashlib.sha256("\0".join(self._file_identity() + parts).encode()).hexdigest()[:32]

    def _file_identity(self) -> tuple[str, str, str]:
        """The model file as what is remembered of it knows it: its path, size and time."""
        path = Path(self.model_file.path).resolve()
        stat = path.stat()
        return str(path), str(stat.st_size), str(stat.st_mtime_ns)

    def close(self) -> None:
        if self.spec:
            self.spec.close()
            self.spec = None
        if self.ctx:
            self.ctx.close()
            self.ctx = None
        if self.model:
            self.model.close()
            self.model = None

    @property
    def costs(self) -> StepCosts | None:
        """What a drafting step costs here against a plain one, as far as it is known (StepClock)."""
        return self.clock.costs() if self.clock else None

    def timing_holds(self) -> bool:
        """Whether a step timed now measures this decoder's costs: not while the thread governor has
        given cores to other programs (a step on fewer threads is another machine)."""
        return self.governor is None or self.governor.threads == self.governor.max_threads

    # --- drafting at load -----------------------------------------------------------------------

    def _drafting_can_pay(self) -> bool:
        """`auto`, before its context is made: when this machine's step costs, remembered from an
        earlier session, say drafting would lose even with the best acceptance real weights reach,
        decode plainly from the start, on a context without the rollback snapshots and hidden-state
        rows that cost every plain step time too (the MTP block stays loaded: loading the model again
        would cost more). Costs not known yet are learnt as decoding goes, at no cost to the load
        (StepClock)."""
        if self.clock.known is None:
            return True
        notice = drafting_verdict(self.clock.costs())
        if notice is None:
            return True
        self.notes.append(notice)
        self.clock = None
        return False

    def _step_clock(self, draft_tokens: int) -> StepClock:
        """`auto`'s clock of this machine's step costs, with what was learnt before for this CPU,
        llama.cpp build, model file (its path, size and time), thread count, draft count, draft
        vocabulary and AMX use (as the loader placed the weights); what it learns is remembered under
        the same key (speculative.remember_costs)."""
        key = remembered.build_key(cpu.cpu_library(), *self._file_identity(), f"threads {self.threads}",
                                   f"drafts {draft_tokens}", f"draft vocabulary {self.draft_vocab}",
                                   f"amx {bool(self.model.amx and self.model.amx.use_amx)}",
                                   "learnt from decoding v3").hexdigest()[:32]
        return StepClock(draft_tokens, known=recall_costs(key), learned=lambda c: remember_costs(key, c))


def default_cache_bytes(mf: ModelFile, drafting: bool) -> int:
    """The checkpoints' budget when the caller gives none: N_CHECKPOINTS recurrent states and a MiB
    for the KV cells of full checkpoints. A drafting model's checkpoints also carry the MTP head's
    side (its pending hidden state; in a full one, its own layer's KV cells): without room for it,
    fewer checkpoints fit, and a server's agent loop evaluated a tool round's prompt again."""
    recurrent = max(recurrent_state_bytes(mf), 1)
    if not drafting:
        return N_CHECKPOINTS * recurrent + (1 << 20)
    n_full = list(mf.arch_key("attention.recurrent_layers", [])).count(False) or 1
    side = 4 * mf.arch_key("embedding_length", 0)
    return N_CHECKPOINTS * (recurrent + side) + (1 << 20) * (n_full + mtp_block_count(mf)) // n_full


def drafting_possible(mf: ModelFile, mode: str, draft_tokens: int) -> bool:
    """Whether to load the MTP head; a missing one is an error only when asked for ("mtp")."""
    check_mode(mode)
    if mode == OFF:
        return False
    if not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise ChatError(f"draft_tokens must be 1 to {MAX_DRAFT_TOKENS}, not {draft_tokens!r}")
    if mtp_block_count(mf) == 0 or mf.architecture not in QWEN35_ARCHS:
        if mode == MTP:
            raise ChatError(f"{mf.path.name} has no multi-token-prediction head (converted with --no-mtp?): "
                            f"leave out --mtp")
        return False
    return True
