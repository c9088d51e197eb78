"""The model state of one llama.cpp context, and a memory-bounded cache of checkpoints of it.

Qwen3.5 is hybrid: the full-attention layers keep a KV cache that can be trimmed back to any
earlier token, the Gated DeltaNet layers keep a recurrent state that cannot. So a conversation can
only resume from a prompt prefix whose recurrent state was saved when the model stood there. The
checkpoints are taken at semantic boundaries, where later prompts of the same conversation are
known to agree (ChatSession picks them): the end of the system + tools prefix, each turn's stable
boundary (after `<|im_start|>assistant\\n`, before `<think>`, where the next turn's rendering
diverges), and the end of the prompt. Checkpoints are keyed by their exact token prefix, and one
is used only when it is a prefix of the new prompt: the state is never a guess.

Two kinds, chosen by cost:

- A **partial** checkpoint (`PARTIAL_ONLY`) holds only the recurrent state — a fixed size whatever
  the position (Qwen3.5-0.8B: ~19 MiB; 4B: ~50 MiB) — and is valid only while the live context
  still holds its prefix in the attention KV cache: restoring it is setting the recurrent state and
  trimming the KV cache. This is the common case (one conversation carrying on), and it is cheap.
- A **full** checkpoint (`FULL`) also holds the attention KV of its prefix (0.8B: 12 KiB a token,
  4B: 32 KiB a token: 24 + 19 MiB for a 2000-token 0.8B prefix) and stays valid whatever the
  context does next. Taking one for every boundary would multiply memory (each turn's copy holds
  all earlier turns), so a partial checkpoint is promoted to full only when it would otherwise be
  lost: when another prompt (another conversation on the same server) is about to replace the live
  state, the live conversation's deepest checkpoint is read out in full first. Its shallower
  checkpoints stay partial and usable: restoring one loads the full checkpoint that extends it,
  then its recurrent state, and trims the KV cache. One copy of the live prefix per switch — a
  memcpy (tens of ms for thousands of tokens) against the seconds its re-evaluation would take.
  A server does that read while it is idle instead (`secure_live`: a full checkpoint at the live
  state's end), so that the request that switches conversations does not wait for it.

Images: a key is a list of KV cells, not only of tokens. An image fills n_tokens cells but (M-RoPE)
advances the position by only n_pos, and has no token ids; so in a key it is n_tokens negative
stand-ins (`image_cells`): n_pos of them carry bits of the image's SHA-256 (a prefix holding an
image matches only the same image, at the same token budget) and the rest are HELD_POSITION, which
does not advance the position. A key's length is its cell count (what the context-full checks
count) and `position(key)` its next position (what llama.cpp's trims and decodes take). Keys end
only at text, never inside an image; across an image only snapshot restore is safe (the recurrent
layers cannot roll back past it), which is all this cache does anyway.

Eviction is least-recently-used under a byte budget (`--cache-ram`). Several llama.cpp sequences
(one per conversation) would avoid the copy on a switch but split the context size between
conversations and multiply the recurrent state kept live; one sequence plus full checkpoints keeps
the whole context for whichever conversation runs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .native import FULL, PARTIAL_ONLY, Context

PREFIX, TURN, PROMPT, REPLY = "prefix", "turn", "prompt", "reply"  # where a checkpoint was taken

# The recurrent states a plain context keeps of its last decode's final tokens (llama.cpp's
# n_rs_seq, made for rolling back drafts), so that a boundary among a prompt's last tokens is kept
# without ending a decode there (`snapshot_back`): the turn boundary before the generation prompt's
# `<think>` block is 4 tokens from the end with thinking off (`<think>`, `\n\n`, `</think>`, `\n\n`),
# 1 with it on. Ending a decode 4 tokens early costs a small decode of its own (2 cores, 0.8B: ~80 ms,
# against ~20 ms for those tokens inside the prompt's batch); the snapshots cost one recurrent state
# each (0.8B: 19 MiB) and no measurable time.
READ_BACK = 4
# When the prompt's attention KV is at most this many times the recurrent state, the checkpoint at
# a prompt's end is taken full where a boundary is read back (`snapshot_end_and_back`), and restored
# after the read: copying that KV twice costs less than evaluating the prompt's tail again (0.8B,
# 2 cores: a 5-token decode takes ~40 ms more than the 1-token one it joins; the KV of a 137-token
# prompt, 1.6 MiB, is copied in ~2 ms; at 1x, ~1,600 tokens, 19 MiB each way).
FULL_END_MAX_KV = 1.0

HELD_POSITION = -1  # an image cell that does not advance the position


def image_cells(digest: bytes, n_tokens: int, n_pos: int) -> tuple[int, ...]:
    """The stand-ins of an image's n_tokens cells in a key: n_pos that advance the position, each
    carrying 30 bits of `digest` (negative, never a token id nor HELD_POSITION), then HELD_POSITION."""
    if not 0 < n_pos <= n_tokens:
        raise ValueError(f"an image of {n_tokens} cells cannot advance {n_pos} positions")
    words = [int.from_bytes(digest[i:i + 4], "little") & 0x3FFFFFFF for i in range(0, len(digest) - 3, 4)]
    return tuple(-2 - words[j % len(words)] for j in range(n_pos)) + (HELD_POSITION,) * (n_tokens - n_pos)


def position(cells) -> int:
    """The position that follows `cells` (a key or the live state): cells minus image cells that
    share a position."""
    return len(cells) - cells.count(HELD_POSITION)


@dataclass
class Checkpoint:
    tokens: tuple[int, ...]
    state: bytearray
    full: bool
    kind: str

    @property
    def nbytes(self) -> int:
        return len(self.state) + 4 * len(self.tokens)


class StateCache:
    """The live state of one context (`tokens`: exactly the cells it holds, in order: token ids and
    image stand-ins) and the checkpoints
    that let a later prompt skip what was evaluated before."""

    def __init__(self, ctx: Context, max_bytes: int) -> None:
        self._ctx = ctx
        self.max_bytes = max_bytes
        self.tokens: list[int] = []
        self._entries: OrderedDict[tuple[int, ...], Checkpoint] = OrderedDict()
        self._insurance: tuple[int, ...] | None = None  # the key secure_live took for the live state

    # --- what the cache holds -------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def checkpoints(self) -> list[Checkpoint]:
        """Least recently used first."""
        return list(self._entries.values())

    def has(self, n_tokens: int) -> bool:
        """Whether a checkpoint exists at the live state's first `n_tokens` tokens."""
        return tuple(self.tokens[:n_tokens]) in self._entries

    def deepest_held(self, kind: str) -> Checkpoint | None:
        """The longest checkpoint of `kind` that the live state extends."""
        held = [c for c in self._entries.values() if c.kind == kind and self._holds(c.tokens)]
        return max(held, key=lambda c: len(c.tokens), default=None)

    # --- changing the state ---------------------------------------------------------------------

    def snapshot(self, kind: str, *, full: bool = False) -> None:
        """Keep the live state at its current position: a partial checkpoint, or a full one (which
        replaces a partial one there)."""
        key = tuple(self.tokens)
        held = self._entries.get(key)
        if not key or held is not None and (held.full or not full):
            if key:
                self._entries.move_to_end(key)
            return
        self._put(Checkpoint(key, self._ctx.get_state(FULL if full else PARTIAL_ONLY), full=full, kind=kind))

    def snapshot_back(self, n_tokens: int, kind: str) -> None:
        """Keep the state the live one had at its first `n_tokens` cells, read from the context's
        snapshots of its last decode: that decode must have ended the live state and covered its
        last len − n_tokens + 1 cells, at most READ_BACK from the end. The live state is left at
        n_tokens (llama.cpp rolls the recurrent state back at the next decode): the caller
        evaluates the rest again, e.g. with the reply's first token."""
        # After the trim, reading the state reads the snapshot llama.cpp will roll back to.
        self._ctx.trim(position(self.tokens[:n_tokens]))
        del self.tokens[n_tokens:]
        self.snapshot(kind)

    def snapshot_end_and_back(self, n_tokens: int, end_kind: str, back_kind: str) -> int:
        """Checkpoints at the live state's end (`end_kind`) and at its first `n_tokens` cells
        (`back_kind`, read back as `snapshot_back` does), after the decode that ended it. Returns how
        many of the last cells the caller must evaluate again: none when the end's checkpoint is
        full (FULL_END_MAX_KV), since it is restored after the read back; else the live state is
        left at n_tokens."""
        key, tail = tuple(self.tokens), self.tokens[n_tokens:]
        if key not in self._entries:
            recurrent = self._ctx.state_size(PARTIAL_ONLY)
            self.snapshot(end_kind, full=self._ctx.state_size(FULL) - recurrent <= FULL_END_MAX_KV * recurrent)
        else:
            self.snapshot(end_kind)
        end = self._entries.get(key)
        self.snapshot_back(n_tokens, back_kind)
        if end is None or not end.full:
            return len(tail)
        self._ctx.set_state(end.state, FULL)  # (also cancels the rollback the read back left pending)
        self.tokens.extend(tail)
        return 0

    def put(self, checkpoint: Checkpoint) -> None:
        """Add a checkpoint read from elsewhere (a saved session)."""
        self._put(checkpoint)

    def secure_live(self) -> bool:
        """Take now, while nothing waits, a full checkpoint at the live state's end: what another
        conversation's prompt would otherwise have to read first (`_keep_live`), and more — every
        checkpoint the live state holds stays reachable through it, and so does what it holds
        past them (a server's prefill of the next prompt's start, a reply the next prompt goes on
        from). The live state stays as it is. Returns whether it read a state.

        It insures the live conversation until the next prompt: one that goes on with it drops the
        insurance (the live state carries it again, and it would hold only a superseded branch);
        one that replaces it keeps it, as that conversation's checkpoint."""
        end = self._entries.get(tuple(self.tokens))
        if self._insurance is not None or not self.tokens or end is not None and end.full:
            return False
        key = tuple(self.tokens)
        self.snapshot(REPLY, full=True)
        self._insurance = key if key in self._entries else None
        return True

    def restore(self, prompt: list[int], limit: int) -> int:
        """Bring the live state to the longest prefix of `prompt` (at most `limit` tokens) it can
        reach without evaluating anything; returns that prefix's length."""
        held = self.tokens
        live = len(held) if len(held) <= limit and prompt[:len(held)] == held else -1
        best = None
        for c in self._entries.values():
            n = len(c.tokens)
            if live < n <= limit and (best is None or n > len(best.tokens)) and tuple(prompt[:n]) == c.tokens \
                    and self._reachable(c):
                best = c
        insurance, self._insurance = self._insurance, None
        if insurance is not None and self._goes_on(prompt, live, insurance):
            self._entries.pop(insurance, None)  # the live conversation goes on: see secure_live
        if best is None:
            if live >= 0:
                return live  # the state is already there: just continue
            self._keep_live(())
            self.clear()
            return 0
        self._keep_live(best.tokens)
        if best.tokens in self._entries:  # (keeping the live state may have evicted it: it is restored all the same)
            self._entries.move_to_end(best.tokens)
        if best.full:
            self._ctx.set_state(best.state, FULL)
        else:
            if not self._holds(best.tokens):
                # The attention KV of its prefix is in a full checkpoint that extends it: load that first.
                base = min((c for c in self._entries.values() if c.full and c.tokens[:len(best.tokens)] == best.tokens),
                           key=lambda c: len(c.tokens), default=None)
                if base is None:  # evicted just now, while keeping the live state
                    self.clear()
                    return 0
                self._ctx.set_state(base.state, FULL)
                self.tokens = list(base.tokens)
            # The attention cache holds the checkpoint's tokens: restore the recurrent state, then
            # drop the attention entries past it.
            self._ctx.set_state(best.state, PARTIAL_ONLY)
            self._ctx.trim(position(best.tokens))
        self.tokens = list(best.tokens)
        self._drop_stale()
        return len(best.tokens)

    def clear(self) -> None:
        """Empty the live state (full checkpoints stay usable, partial ones go)."""
        self._ctx.clear()
        self.tokens = []
        self._insurance = None
        self._drop_stale()

    def forget(self) -> None:
        """Empty the live state and drop every checkpoint."""
        self._ctx.clear()
        self.tokens = []
        self._insurance = None
        self._entries.clear()

    # --- internals ------------------------------------------------------------------------------

    def _goes_on(self, prompt: list[int], live: int, insurance: tuple[int, ...]) -> bool:
        """Whether `prompt` goes on with the live conversation: it extends the live state, or at least
        its deepest checkpoint (a reply re-rendered otherwise than the model wrote it). A prompt
        that shares only a shallower checkpoint (another conversation with the same system prompt
        and tools) replaces it, and the insurance is then that conversation's checkpoint."""
        if live >= 0:
            return True
        held = [c for c in self._entries.values() if c.tokens != insurance and self._holds(c.tokens)]
        deepest = max(held, key=lambda c: len(c.tokens), default=None)
        return deepest is not None and tuple(prompt[:len(deepest.tokens)]) == deepest.tokens

    def _holds(self, tokens: tuple[int, ...]) -> bool:
        return len(tokens) <= len(self.tokens) and tuple(self.tokens[:len(tokens)]) == tokens

    def _reachable(self, c: Checkpoint) -> bool:
        """A full checkpoint always is; a partial one while the live state holds its prefix, or a
        full checkpoint does (restored first)."""
        return c.full or self._holds(c.tokens) or self._extended_by_full(c)

    def _extended_by_full(self, c: Checkpoint) -> bool:
        return any(f.full and len(f.tokens) > len(c.tokens) and f.tokens[:len(c.tokens)] == c.tokens
                   for f in self._entries.values())

    def _doomed(self, target: tuple[int, ...]) -> list[Checkpoint]:
        """The checkpoints that would be lost if the live state became `target`: partial ones it
        holds that `target` does not, and that no full checkpoint extends."""
        return [c for c in self._entries.values()
                if not c.full and self._holds(c.tokens) and c.tokens != target[:len(c.tokens)]
                and not self._extended_by_full(c)]

    def _keep_live(self, target: tuple[int, ...]) -> None:
        """The live state is about to become `target`: if it holds checkpoints that would then be
        lost, read the deepest of them out in full first (the shallower ones stay reachable through
        it), so that conversation can resume later."""
        doomed = self._doomed(target)
        if not doomed:
            return
        deepest = max(doomed, key=lambda c: len(c.tokens))
        self._ctx.set_state(deepest.state, PARTIAL_ONLY)
        self._ctx.trim(position(deepest.tokens))
        self.tokens = list(deepest.tokens)
        self._entries.pop(deepest.tokens, None)
        self._put(Checkpoint(deepest.tokens, self._ctx.get_state(FULL), full=True, kind=deepest.kind))

    def _drop_stale(self) -> None:
        """Partial checkpoints that can no longer be reached are useless: drop them."""
        for key in [k for k, c in self._entries.items() if not self._reachable(c)]:
            del self._entries[key]

    def _put(self, checkpoint: Checkpoint) -> None:
        if checkpoint.nbytes > self.max_bytes:
            return  # larger than the whole budget: keeping it would evict everything else
        self._entries[checkpoint.tokens] = checkpoint
        self._entries.move_to_end(checkpoint.tokens)
        total = self.nbytes
        evicted_full = False
        while total > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            total -= evicted.nbytes
            evicted_full |= evicted.full
        if evicted_full:
            self._drop_stale()
