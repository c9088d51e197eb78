"""llama.cpp through llama-cpp-python's low-level bindings: only what a chat needs.

The high-level `llama_cpp.Llama` is not used: it copies the logits of every step into numpy and
samples in Python over the whole 248k-token vocabulary, and it cannot snapshot the recurrent state
of one sequence. Here every step is one `llama_decode` and one `llama_sampler_sample` (llama.cpp's
native sampler chain), and the sequence state is read and written with `llama_state_seq_*_ext`.
"""

from __future__ import annotations

import ctypes
import sys
from collections import deque
from dataclasses import dataclass

import llama_cpp as L

from .errors import ChatError, ContextFull, EngineFailure

SEQ = 0  # one conversation, one sequence
TURN_START = "<|im_start|>"  # where Model.tokenize cuts a conversation into messages
MAX_SEGMENTS_KEPT = 4096  # messages whose tokens Model.tokenize remembers

# llama.h: work only with the part of the memory that cannot be rolled back (the recurrent state),
# leaving the attention KV cache, which can be trimmed, alone.
PARTIAL_ONLY = 1
FULL = 0


class _Log:
    """Collects llama.cpp's log (quiet by default) so a failure can quote its reason."""

    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=64)
        self.buffer_lines: list[str] = []  # "CPU_REPACK model buffer size = 12.34 MiB", kept whole
        self.verbose = False
        self._partial = ""
        self._callback = L.llama_log_callback(self._on_log)  # kept alive: llama.cpp holds the pointer

    def _on_log(self, level: int, text: bytes, _user_data) -> None:
        message = self._partial + text.decode("utf-8", "replace")
        lines = message.split("\n")
        self._partial = lines.pop()  # llama.cpp sends some lines in pieces
        self.lines.extend(line for line in lines if line.strip())
        self.buffer_lines.extend(line for line in lines if "model buffer size" in line)
        if self.verbose:
            sys.stderr.write(text.decode("utf-8", "replace"))

    @property
    def callback(self):
        """The C callback, for libraries with their own log hook (mtmd)."""
        return self._callback

    def install(self, verbose: bool) -> None:
        self.verbose = verbose
        L.llama_log_set(self._callback, None)

    def clear(self) -> None:
        self.lines.clear()
        self.buffer_lines.clear()

    def find(self, *needles: str) -> str | None:
        for line in self.lines:
            if any(n in line for n in needles):
                return line.strip()
        return None


log = _Log()
_initialized = False


def init(verbose: bool = False) -> None:
    global _initialized
    log.install(verbose)
    if not _initialized:
        L.llama_backend_init()
        _initialized = True


def model_params(*, vocab_only: bool = False, load_mtp: bool = False, mapped: bool = True):
    """llama.cpp's model parameters for every model qwen35 loads: the one place they are chosen.
    (Where the weights go — the AMX and CPU_REPACK buffer types — is decided by runtime.cpu
    before the load, and reported by Model.placement after it.) `load_mtp` also loads the
    multi-token-prediction block, which llama.cpp otherwise skips; speculative decoding needs it.
    `mapped`: memory-map the file (llama.cpp's default) or read it (memory.maps_weights says which)."""
    params = L.llama_model_default_params()
    params.vocab_only = vocab_only
    params.load_mtp = load_mtp and not vocab_only
    if not mapped:
        params.load_mode = L.LLAMA_LOAD_MODE_NONE
    return params


def weights_line(placement: dict[str, float], mapped: bool, amx: tuple[bool, str] | None) -> str:
    """E.g. "weights: CPU_REPACK 120.3 MiB, CPU 340.1 MiB; AMX off: this CPU … has no AMX" (for
    Model.describe_placement and `qwen35 bench`'s saved results alike)."""
    where = ", ".join(f"{name} {mib:,.1f} MiB" for name, mib in placement.items()) or "unknown"
    read = "" if mapped else " (the file read, not mapped: most of it is copied at load)"
    decision = f"; AMX {'on' if amx[0] else 'off'}: {amx[1]}" if amx else ""
    return f"weights: {where}{read}{decision}"


class Model:
    """Weights and vocabulary of one GGUF file.

    `placement` (the default) applies the AMX decision of runtime.cpu before loading; the probe
    that informs it loads models with `placement=False`, having chosen the buffer types itself.
    """

    def __init__(self, path: str, *, vocab_only: bool = False, placement: bool = True, load_mtp: bool = False,
                 mapped: bool = True) -> None:
        from . import cpu

        init(log.verbose)
        self.amx: cpu.Decision | None = None
        if placement and not vocab_only:
            self.amx = cpu.place_weights(path)
        log.clear()
        self._model = L.llama_model_load_from_file(str(path).encode(),
                                                   model_params(vocab_only=vocab_only, load_mtp=load_mtp,
                                                                mapped=mapped))
        if not self._model:
            reason = (log.find("unknown model architecture", "error loading model", "failed to")
                      or "llama.cpp gave no reason")
            raise ChatError(f"llama.cpp could not load {path}: {reason}")
        self.path = str(path)
        self.placement = _placement(log.buffer_lines)
        self.mapped = mapped
        self.vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_embd = L.llama_model_n_embd_out(self._model)
        self.mtp_loaded = load_mtp and not vocab_only and L.llama_model_n_layer_nextn(self._model) > 0
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._segments: dict[str, list[int]] = {}
        start = self._tokenize(TURN_START)
        self._turn_start = start[0] if len(start) == 1 and self.is_control(start[0]) else None

    def describe_placement(self) -> str:
        """The CPU features llama.cpp uses, and `weights_line`."""
        from . import cpu

        amx = (self.amx.use_amx, self.amx.reason) if self.amx else None
        return f"llama.cpp CPU features: {' '.join(cpu.features())}\n{weights_line(self.placement, self.mapped, amx)}"

    @property
    def ptr(self):
        return self._model

    def size_bytes(self) -> int:
        return L.llama_model_size(self._model)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text`, with special-token text (`<|im_start|>`…) read as those tokens, as the
        Hugging Face tokenizer does for a rendered chat template. Never adds BOS: Qwen3.5 has none.

        A conversation is tokenized message by message, each message's tokens remembered: a turn
        renders and tokenizes the whole conversation several times (its prompt, the turn boundaries
        the next prompt will share, a server's check of the request), and tokenizing every message
        again took ~5 ms a request for a 600-token tool conversation, a tenth of a small model's time
        to its first token. Exact: llama.cpp splits a text at its special tokens before it applies
        BPE to the pieces between them, so a text cut before each `<|im_start|>` (where that is one
        special token) tokenizes piece by piece to the same tokens."""
        if self._turn_start is None or TURN_START not in text:
            return self._tokenize(text)
        out: list[int] = []
        for i, part in enumerate(text.split(TURN_START)):
            segment = TURN_START + part if i else part
            if not segment:
                continue
            tokens = self._segments.get(segment)
            if tokens is None:
                tokens = self._tokenize(segment)
                if len(self._segments) >= MAX_SEGMENTS_KEPT:
                    self._segments.clear()  # (a bound, not an LRU: a conversation's messages come back together)
                self._segments[segment] = tokens
            out += tokens
        return out

    def _tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buf = (L.llama_token * capacity)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, capacity, False, True)
        if n < 0:  # cannot happen for byte-level BPE (≤ 1 token per byte), but be exact
            capacity = -n
            buf = (L.llama_token * capacity)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, capacity, False, True)
        return buf[:n]

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for; empty for control tokens (`<|im_end|>`…)."""
        piece = self._pieces.get(token)
        if piece is None:
            n = L.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
            piece = self._piece_buf.raw[:n] if n > 0 else b""
            self._pieces[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        return L.llama_vocab_is_eog(self.vocab, token)

    def is_control(self, token: int) -> bool:
        return L.llama_vocab_is_control(self.vocab, token)

    def single_token(self, text: str) -> int | None:
        """The id of a token written as `text` (e.g. "</think>"), or None if it is not one token."""
        tokens = self.tokenize(text)
        return tokens[0] if len(tokens) == 1 else None

    def close(self) -> None:
        if self._model:
            L.llama_model_free(self._model)
            self._model = None


def _placement(buffer_lines: list[str]) -> dict[str, float]:
    """{buffer type: MiB} from the loader's "<type> model buffer size = <n> MiB" lines. The plain
    CPU buffer of a memory-mapped file is called CPU_Mapped; we call it CPU."""
    placement: dict[str, float] = {}
    for line in buffer_lines:
        head, _, tail = line.partition("model buffer size =")
        name = head.rsplit(":", 1)[-1].strip().removesuffix("_Mapped")
        try:
            placement[name] = placement.get(name, 0.0) + float(tail.split()[0])
        except (ValueError, IndexError):
            continue
    return placement


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's sampler chain settings; `temp` ≤ 0 means greedy. The defaults are llama.cpp's,
    except min-p, which Qwen's recommended settings (and Hugging Face's defaults) leave off."""

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random


def greedy_token(logits) -> int | None:
    """The token llama.cpp's greedy sampler picks from `logits`: the first highest. None where a NaN
    is among them (numpy's argmax would pick it, llama.cpp's comparisons skip it): the native chain
    then decides, as it always did."""
    token = int(logits.argmax())
    return None if logits[token] != logits[token] else token


class Sampler:
    """A native sampler chain in llama.cpp's default order (grammar.build_chain). `constraints`
    (native samplers such as a logit bias or llama.cpp's own grammar, see constraints.py) go
    first; the chain owns them. `grammar` (a grammar.Grammar) checks each draw at the end of the
    chain, exactly (see grammar.py): a draw it allows costs one check, a refused one a mask."""

    def __init__(self, s: Sampling, n_vocab: int, constraints=(), grammar=None) -> None:
        from .grammar import GrammarStage, build_chain

        self.grammar = GrammarStage(grammar, s, n_vocab) if grammar is not None else None
        self._chain = build_chain(s, n_vocab, first=constraints, last=[self.grammar.ptr] if self.grammar else ())
        # Greedy and nothing else (an agent's temperature 0): the token is the logits' argmax, read
        # where llama.cpp left them. llama_sampler_sample first copies all 248,320 logits into
        # candidates to walk them once: 0.64 ms a token on the AMD EPYC, against 0.06 ms this way
        # (the demo model's step is ~9 ms; docs/benchmarks.md, "Serving").
        self._argmax = s.temp <= 0 and s.repeat_penalty == 1.0 and s.presence_penalty == 0.0 \
            and not constraints and grammar is None

    def _accept_argmax(self, logits) -> int | None:
        """The greedy token of `logits`, accepted as the chain would; None: the chain decides."""
        token = greedy_token(logits)
        if token is not None:
            L.llama_sampler_accept(self._chain, token)
        return token

    def sample(self, ctx: "Context", i: int = -1) -> int:
        """Sample (and accept) a token from the logits of output `i` of the last decode (-1: the last)."""
        token = self._accept_argmax(ctx.logits_view(i)) if self._argmax else None
        if token is not None:
            return token
        if self.grammar is None:
            return L.llama_sampler_sample(self._chain, ctx.ptr, i)
        self.grammar.logits = lambda: ctx.logits(i)
        token = L.llama_sampler_sample(self._chain, ctx.ptr, i)
        self.grammar.raise_error()
        return token

    def sample_logits(self, logits) -> int:
        """Sample (and accept) a token from `logits` (a float32 array over the vocabulary) held
        outside a context: what `sample` does with a context's."""
        import numpy as np

        from .grammar import draw

        logits = np.ascontiguousarray(logits, dtype=np.float32)
        token = self._accept_argmax(logits) if self._argmax else None
        if token is not None:
            return token
        if self.grammar is not None:
            self.grammar.logits = lambda: logits
        token = draw(self._chain, np.arange(len(logits), dtype=np.int32), logits)
        if self.grammar is not None:
            self.grammar.raise_error()
        L.llama_sampler_accept(self._chain, token)
        if self.grammar is not None:
            self.grammar.raise_error()
        return token

    def close(self) -> None:
        if self._chain:
            L.llama_sampler_free(self._chain)
            self._chain = None
        if self.grammar is not None:
            self.grammar.close()


class Context:
    """A llama.cpp context holding one sequence: decode tokens, trim, and snapshot its state."""

    def __init__(self, model: Model, n_ctx: int, threads: int, n_batch: int = 512, *,
                 all_logits: bool = False, exact: bool = False, n_outputs: int = 1, n_rollback: int = 0,
                 mtp: bool = False) -> None:
        """`all_logits` gives every decoded token logits (for tests that compare whole prompts);
        `exact` keeps keys and values in f32 and attention off flash attention, which both round
        through f16 — for comparisons against a float32 reference.

        For speculative decoding: `n_outputs` tokens of one decode may have logits (the verified
        draft), `n_rollback` recurrent-state snapshots let `trim` drop up to that many tokens of
        the last decode, and `mtp` makes this the context that runs the model's MTP block."""
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = threads
        params.n_outputs_max = n_batch if all_logits else n_outputs
        params.n_rs_seq = n_rollback
        if mtp:
            params.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
        if exact:
            params.type_k = params.type_v = L.GGML_TYPE_F32
            params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._all_logits = all_logits
        self._n_vocab = model.n_vocab
        log.clear()
        self._ctx = L.llama_init_from_model(model.ptr, params)
        if not self._ctx:
            reason = log.find("failed", "error") or "llama.cpp gave no reason"
            raise ChatError(f"llama.cpp could not create a {n_ctx}-token context: {reason}")
        self.n_ctx = L.llama_n_ctx(self._ctx)  # llama.cpp rounds the size up to a multiple of 256
        self.n_batch = L.llama_n_batch(self._ctx)  # and never makes a batch larger than the context
        self.n_rollback = L.llama_n_rs_seq(self._ctx)  # 0 where the architecture cannot roll back
        self._mem = L.llama_get_memory(self._ctx)
        self._batch = L.llama_batch_init(n_batch, 0, 1)

    @property
    def ptr(self):
        return self._ctx

    def decode(self, tokens: list[int], pos: int, *, cells: int | None = None, logits_last: bool = True,
               logits_all: bool = False, logits_tail: int = 0) -> None:
        """Evaluate `tokens` at positions pos, pos+1, …; only the last one gets logits (if asked),
        or every one (`logits_all`, at most n_outputs of them: a draft being verified), or the last
        `logits_tail` (at most n_outputs: what `auto` holds a new MTP head's would-be drafts against).
        `cells`: how many KV cells the context holds already — more than `pos` after an image,
        which fills more cells than it advances positions (M-RoPE); it is what fills the context.
        Callers feed at most n_batch tokens at a time, so they can stop between batches."""
        n = len(tokens)
        assert 0 < n <= self.n_batch
        if (pos if cells is None else cells) + n > self.n_ctx:
            raise ContextFull(f"context full ({self.n_ctx} tokens)")
        b = self._batch
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = SEQ
            b.logits[i] = 1 if self._all_logits or logits_all or i >= n - logits_tail else 0
        b.logits[n - 1] = 1 if logits_last or self._all_logits else 0
        rc = L.llama_decode(self._ctx, b)
        if rc == 1:
            raise ContextFull(f"context full ({self.n_ctx} tokens)")
        if rc != 0:
            raise EngineFailure(f"llama_decode failed (code {rc}): {log.find('error', 'failed') or 'no reason given'}")

    def logits(self, i: int):
        """Logits of output `i` of the last decode (-1: the last), as a numpy float32 copy."""
        return self.logits_view(i).copy()

    def logits_view(self, i: int):
        """The same, read in place: valid until the next decode."""
        import numpy as np

        ptr = L.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise ChatError(f"llama.cpp has no logits for output {i} of the last decode")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def set_threads(self, threads: int) -> None:
        """Threads of the next decodes (generation and prompt batches alike); takes effect at once."""
        L.llama_set_n_threads(self._ctx, threads, threads)

    def trim(self, pos: int) -> None:
        """Drop every cell at a position ≥ pos (the token count, in a text-only context). For the
        recurrent layers this only succeeds when the state is already at pos (restored from a
        checkpoint), or, in a context made with `n_rollback`, when it drops at most that many
        tokens — and not all — of the last decode."""
        if not L.llama_memory_seq_rm(self._mem, SEQ, pos, -1):
            raise ChatError(f"llama.cpp cannot roll the model state back to position {pos}")

    def clear(self) -> None:
        # Cells only, not data (as llama.cpp's server drops a sequence): zeroing the buffers costs
        # ~17 ms for an 8192-token 0.8B context, on every new conversation's first prompt. Nothing
        # reads the stale data: attention masks the cells no sequence holds, and a recurrent cell
        # that starts a sequence has its state zeroed in the graph (llama-graph.cpp, build_rs rs_zero).
        L.llama_memory_clear(self._mem, False)

    def n_past(self) -> int:
        """The next position (not the cell count, after an image)."""
        return L.llama_memory_seq_pos_max(self._mem, SEQ) + 1

    def state_size(self, flags: int) -> int:
        return L.llama_state_seq_get_size_ext(self._ctx, SEQ, flags)

    def get_state(self, flags: int) -> bytearray:
        size = self.state_size(flags)
        data = bytearray(size)  # written in place: no second copy of a state that can be large
        written = L.llama_state_seq_get_data_ext(self._ctx, (ctypes.c_uint8 * size).from_buffer(data), size, SEQ, flags)
        if written != size:
            raise ChatError(f"llama.cpp wrote {written} bytes of a {size}-byte sequence state")
        return data

    def set_state(self, data: bytes | bytearray, flags: int) -> None:
        array_type = ctypes.c_uint8 * len(data)
        buf = array_type.from_buffer(data) if isinstance(data, bytearray) else array_type.from_buffer_copy(data)
        if L.llama_state_seq_set_data_ext(self._ctx, buf, len(data), SEQ, flags) != len(data):
            raise ChatError("llama.cpp could not restore the saved model state (different model or context size?)")

    def close(self) -> None:
        if self._ctx:
            L.llama_batch_free(self._batch)
            L.llama_free(self._ctx)
            self._ctx = None
