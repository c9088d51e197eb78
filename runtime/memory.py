"""How much memory a chat with a GGUF will take, before loading it.

The parts, as llama.cpp allocates them on the CPU (sizes checked against its own log):
- weights: the tensors it loads (the multi-token-prediction layer is skipped at load time);
- vocabulary: llama.cpp's token tables and BPE merge ranks (~430 bytes a token, measured);
- KV cache: only for the full-attention layers (one in four in Qwen3.5), n_ctx cells of K and V in f16;
- recurrent state: the Gated DeltaNet layers' fixed-size convolution and state matrices, which do
  not grow with the context;
- saved checkpoints: copies of that recurrent state kept at turn boundaries;
- compute and output buffers for a prompt batch, and the context's own bookkeeping (graph and
  scheduler metadata, the thread pool and its malloc arenas: 13-30 MiB measured at 2 threads);
- and what this process already holds (Python, the libraries).
"""

from __future__ import annotations

from dataclasses import dataclass

from .modelfile import ModelFile
from .system import available_ram, current_rss

VOCAB_BYTES_PER_TOKEN = 430
F16, F32 = 2, 4
CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this
GIB = 1024 ** 3
MIB = 1024 ** 2
CONTEXT_OVERHEAD = 12 * MIB
THREAD_OVERHEAD = 4 * MIB


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    vocab: int
    kv_cache: int
    recurrent: int
    checkpoints: int
    buffers: int
    process: int
    n_ctx: int

    @property
    def total(self) -> int:
        return (self.weights + self.vocab + self.kv_cache + self.recurrent + self.checkpoints + self.buffers
                + self.process)

    @property
    def to_load(self) -> int:
        return self.total - self.process

    def describe(self) -> str:
        parts = [("weights", self.weights), ("vocabulary", self.vocab),
                 (f"KV cache for {self.n_ctx} tokens", self.kv_cache),
                 ("recurrent state + checkpoints", self.recurrent + self.checkpoints), ("buffers", self.buffers)]
        return ", ".join(f"{name} {_gib(size)}" for name, size in parts)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def recurrent_state_bytes(mf: ModelFile) -> int:
    """One sequence's Gated DeltaNet state: per linear layer, the last (kernel-1) conv inputs over the
    q/k/v channels and a state_size × inner_size matrix, both f32."""
    n_linear = sum(1 for r in mf.arch_key("attention.recurrent_layers", []) if r)
    d_state = mf.arch_key("ssm.state_size", 0)
    d_inner = mf.arch_key("ssm.inner_size", 0)
    channels = 2 * mf.arch_key("ssm.group_count", 0) * d_state + d_inner
    conv = (mf.arch_key("ssm.conv_kernel", 1) - 1) * channels * F32
    return n_linear * (conv + d_state * d_inner * F32)


def estimate(mf: ModelFile, n_ctx: int, *, n_batch: int, n_checkpoints: int, threads: int) -> MemoryEstimate:
    n_layer = mf.arch_key("block_count", 0)
    n_mtp = mf.arch_key("nextn_predict_layers", 0)
    main_layers = n_layer - n_mtp
    skipped = {f"blk.{i}." for i in range(main_layers, n_layer)}
    weights = sum(t.nbytes for t in mf.tensors if t.name[:t.name.find(".", 4) + 1] not in skipped)

    recurrent_flags = list(mf.arch_key("attention.recurrent_layers", [False] * n_layer))[:main_layers]
    n_full = recurrent_flags.count(False)
    n_ctx_cells = -(-n_ctx // CTX_PAD) * CTX_PAD
    head_kv = mf.arch_key("attention.head_count_kv", 0)
    if isinstance(head_kv, list):
        head_kv = max(head_kv)
    kv_width = head_kv * (mf.arch_key("attention.key_length", 0) + mf.arch_key("attention.value_length", 0))
    kv_cache = n_ctx_cells * n_full * kv_width * F16

    recurrent = recurrent_state_bytes(mf)
    # Peak activations of a prompt batch: the widest per-token tensors of a layer (the q/k/v conv
    # channels, the FFN) plus the f16 attention mask; fitted to llama.cpp's reported compute buffer.
    n_embd = mf.arch_key("embedding_length", 0)
    channels = (2 * mf.arch_key("ssm.group_count", 0) * mf.arch_key("ssm.state_size", 0)
                + mf.arch_key("ssm.inner_size", 0))
    n_ff = max(mf.arch_key("feed_forward_length", 0),
               mf.arch_key("expert_used_count", 0) * mf.arch_key("expert_feed_forward_length", 0))
    compute = n_batch * F32 * (int(2.5 * channels) + n_ff + 2 * n_embd) + n_ctx_cells * n_batch * F16
    output = mf.n_tokens * F32  # logits of the one token we sample from
    overhead = CONTEXT_OVERHEAD + threads * THREAD_OVERHEAD
    return MemoryEstimate(
        weights=weights, vocab=mf.n_tokens * VOCAB_BYTES_PER_TOKEN, kv_cache=kv_cache, recurrent=recurrent,
        checkpoints=n_checkpoints * recurrent, buffers=compute + output + overhead, process=current_rss(), n_ctx=n_ctx)


def check_fits(est: MemoryEstimate, available: int | None = None) -> str | None:
    """None if the model fits in available RAM, else the reason and what to do about it."""
    available = available_ram() if available is None else available
    if est.to_load <= available:
        return None
    advice = "try a smaller quantization (e.g. Q4_K_M)"
    if est.kv_cache > est.to_load / 8 and est.n_ctx > 4096:
        advice += f" or a smaller --ctx-size (the KV cache for {est.n_ctx} tokens is {_gib(est.kv_cache)})"
    return (f"this model needs about {_gib(est.to_load)} ({est.describe()}) but only {_gib(available)} of RAM "
            f"is available; {advice}, or pass --force to load it anyway")
