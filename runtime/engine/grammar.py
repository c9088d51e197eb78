"""Constrained sampling that costs nothing while the model keeps to the grammar.

llama.cpp's grammar sampler walks all 248,320 candidates through the grammar before every draw
(~50 ms a token on two cores). Here the draw comes first: the sampler chain draws a token as for
free text, the grammar checks that one token (microseconds), and only a token the grammar refuses
costs a token mask. The grammar itself (what is allowed, when it wakes) is the caller's: anything
with the `Grammar` methods (conversation/constraints.py builds them with llguidance).

What is drawn, exactly. Let `p` be the distribution the chain draws from for free text — the
model's logits after penalties, truncated by top-k, top-p and min-p, scaled by the temperature —
and `A` the tokens the grammar allows. The answer is drawn from p restricted to A, renormalized:

    q(a) = p(a) / p(A)   for a in A (and 0 elsewhere), when p(A) > 0.

`GrammarStage` draws t ~ p; if t is in A it is kept, otherwise a second, independent draw is made
from p's candidates restricted to A (llama.cpp's `dist` over their logits, which renormalizes).
A token a in A comes out either first time, with probability p(a), or after a refusal, with
probability (1 - p(A)) · p(a) / p(A); the sum is p(a) / p(A) = q(a). (This is rejection sampling
with the rejection step done exactly instead of by drawing again: the result is the same
distribution, and one refusal costs one mask, never a loop.)

When p(A) = 0 — the truncated candidates are all refused (greedy decoding, whose single candidate
is refused; a model that does not follow the format at all) — the draw is the chain's over the
allowed tokens alone: the logits masked to A, then penalties, top-k, top-p, min-p, temperature and
the draw, as llama.cpp's grammar sampler first in the chain gives. Greedy decoding so picks the
best allowed token; the two rules agree whenever the model's own top candidates are allowed.

A speculative verify samples row after row through the same stage (it is in the chain), so every
accepted draft token was checked against the grammar in the state after the tokens before it.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import replace
from typing import Callable, Protocol

import numpy as np

import llama_cpp as L

from .errors import ChatError

# llama_token_data as numpy sees it: the candidates of a llama_token_data_array, in place.
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert TOKEN_DATA.itemsize == ctypes.sizeof(L.llama_token_data)


class Grammar(Protocol):
    """What may be sampled next, token by token."""

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (cheap: asked once per sampled token)."""

    def allowed(self) -> np.ndarray:
        """Every token that may come next, as a bool array over the vocabulary (the mask: asked
        only when a sampled token is refused)."""

    def accept(self, token: int) -> None:
        """`token` was sampled: move on."""


def build_chain(s, n_vocab: int, first=(), last=()):
    """A native sampler chain in llama.cpp's default order (penalties → top-k → top-p → min-p →
    temperature → draw), `first` before it and `last` after it; the chain owns them all. Stages
    that would do nothing are left out: each one walks the candidates."""
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    add = lambda smpl: L.llama_sampler_chain_add(chain, smpl)  # noqa: E731
    for sampler in first:
        add(sampler)
    if s.repeat_penalty != 1.0 or s.presence_penalty != 0.0:
        add(L.llama_sampler_init_penalties(n_vocab, 64, s.repeat_penalty, 0.0, s.presence_penalty))
    if s.temp <= 0:
        add(L.llama_sampler_init_greedy())
    else:
        if s.top_k > 0:
            add(L.llama_sampler_init_top_k(s.top_k))
        if 0 < s.top_p < 1:
            add(L.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(L.llama_sampler_init_min_p(s.min_p, 1))
        add(L.llama_sampler_init_temp(s.temp))
        add(L.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
    for sampler in last:
        add(sampler)
    return chain


def candidates(array) -> np.ndarray:
    """The candidates of a llama_token_data_array, as a numpy view (TOKEN_DATA) of its memory."""
    address = ctypes.cast(array.data, ctypes.c_void_p).value
    return np.frombuffer((ctypes.c_char * (array.size * TOKEN_DATA.itemsize)).from_address(address), TOKEN_DATA)


def draw(sampler, ids: np.ndarray, logits: np.ndarray) -> int:
    """Apply a native sampler (or chain) to the candidates `ids` with `logits`, without accepting;
    the token it selects."""
    data = np.empty(len(ids), TOKEN_DATA)
    data["id"], data["logit"], data["p"] = ids, logits, 0.0
    array = L.llama_token_data_array(data.ctypes.data_as(L.llama_token_data_p), len(ids), -1, False)
    L.llama_sampler_apply(sampler, ctypes.byref(array))
    if not 0 <= array.selected < array.size:
        raise ChatError("the sampler selected no token")
    return int(candidates(array)[array.selected]["id"])


def _derived_seed(seed: int, k: int) -> int:
    """An independent seed for the k-th extra draw (a fixed seed stays reproducible; the default,
    LLAMA_DEFAULT_SEED, stays random)."""
    seed &= 0xFFFFFFFF
    return seed if seed == 0xFFFFFFFF else (seed + 0x9E3779B9 * k) & 0xFFFFFFFE


class GrammarStage:
    """The last stage of a sampler chain (a native llama_sampler with Python callbacks): checks the
    chain's draw against `grammar`, draws again as the module docstring says when it is refused,
    and moves the grammar on at accept. `logits` gives the raw logits of the row being sampled (the
    fallback draw needs them: the chain has truncated its candidates by then)."""

    def __init__(self, grammar: Grammar, s, n_vocab: int) -> None:
        self.grammar = grammar
        self.logits: Callable[[], np.ndarray] | None = None
        self.error: BaseException | None = None
        self.checked = self.refused = 0
        self.mask_s = 0.0  # computing masks (CPU time of the sampling thread: a busy machine does not inflate it)
        self.seconds = 0.0  # all the grammar's work, checks, masks, draws again, moving on (CPU time too)
        self._greedy = s.temp <= 0
        # The restricted draw: llama.cpp's `dist` over the allowed candidates (sampling only).
        self._redraw = None if self._greedy else L.llama_sampler_init_dist(_derived_seed(s.seed, 1))
        # The grammar-first draw, for p(A) = 0: the same chain over the allowed tokens. Its penalty
        # history follows the tokens accepted, as the main chain's does.
        self._fallback = build_chain(replace(s, seed=_derived_seed(s.seed, 2)), n_vocab)
        self._iface = L.llama_sampler_i()
        self._callbacks = (L.llama_sampler_i_apply(self._apply), L.llama_sampler_i_accept(self._accept))
        self._iface.apply, self._iface.accept = self._callbacks
        # Allocated by llama.cpp; the chain it joins frees it (the interface has no `free`: what
        # it holds is freed by `close`).
        self.ptr = L.llama_sampler_init(ctypes.pointer(self._iface), None)

    def _apply(self, _smpl, cur_p) -> None:
        # An exception cannot cross llama.cpp: it is kept, and raised by Sampler.sample.
        entered = time.thread_time()
        try:
            cur = cur_p.contents
            token = cur.data[cur.selected].id
            self.checked += 1
            if self.grammar.allows(token):
                return
            self.refused += 1
            start = time.thread_time()
            allowed = self.grammar.allowed()
            self.mask_s += time.thread_time() - start
            chosen = None
            if not self._greedy:
                drawn = candidates(cur)
                keep = allowed[drawn["id"]]
                if keep.any():
                    chosen = draw(self._redraw, drawn["id"][keep], drawn["logit"][keep])
            if chosen is None:
                ids = np.flatnonzero(allowed).astype(np.int32)
                if not len(ids):
                    raise ChatError("the output grammar allows no token here")
                chosen = draw(self._fallback, ids, self.logits()[ids])
            cur.data[cur.selected].id = chosen
        except BaseException as e:  # noqa: BLE001 - raised again on the Python side
            self.error = e
        finally:
            self.seconds += time.thread_time() - entered

    def _accept(self, _smpl, token: int) -> None:
        entered = time.thread_time()
        try:
            self.grammar.accept(token)
            L.llama_sampler_accept(self._fallback, token)
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            self.seconds += time.thread_time() - entered

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        if self._redraw:
            L.llama_sampler_free(self._redraw)
            self._redraw = None
        if self._fallback:
            L.llama_sampler_free(self._fallback)
            self._fallback = None
