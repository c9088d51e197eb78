"""How much memory a chat with a GGUF will take, before loading it.

The parts, as llama.cpp allocates them on the CPU (sizes checked against its own log):
- weights: the tensors it loads, memory-mapped from the file (the multi-token-prediction layer is
  skipped at load time, unless speculative decoding loads it);
- repacked weights: on CPUs where llama.cpp rearranges a type into interleaved blocks at load time
  (CPU_REPACK: Q4_0/Q8_0/K-quants with ARM dotprod or i8mm, Q4_0/Q4_K/IQ4_NL with x86 AVX2; see
  repack.py), and AMX where runtime.cpu lets it run (its tiles take a few bytes a block more), an
  anonymous copy of each such weight. A mapped original stays resident after loading but is
  never read again, so it is counted in the peak and left out of what must fit — and where the
  copies would be most of the file, the file is read instead of mapped (`maps_weights`); a tied
  embedding is held twice for good (the input lookup reads the weights as loaded, the output
  projection its repacked copy);
- vocabulary: llama.cpp's token tables and BPE merge ranks (~430 bytes a token, measured);
- KV cache: only for the full-attention layers (one in four in Qwen3.5), n_ctx cells of K and V in f16;
- recurrent state: the Gated DeltaNet layers' fixed-size convolution and state matrices, which do
  not grow with the context, and READ_BACK snapshots of it (state_cache.py);
- saved checkpoints: copies of that recurrent state kept at turn boundaries;
- compute and output buffers for a prompt batch, and the context's own bookkeeping (graph and
  scheduler metadata, the thread pool and its malloc arenas: 13-30 MiB measured at 2 threads);
- with speculative decoding (`draft_tokens` N > 0): the MTP layer's weights (counted with the
  weights), a second context
  over them (a KV cache of one attention layer, its compute buffer, one row of logits), N more
  recurrent states in the model's context (the snapshots a rejected draft is rolled back to),
  logits for the N+1 rows of a verify, the hidden state of every token of a batch, and the
  reduced draft's copy of the output rows of its `draft_vocab` tokens (draft_head.py);
- with an mmproj (the vision tower, loaded at the first image): its weights, which mtmd reads into
  memory rather than mapping, the compute buffer of encoding the largest image the budget
  (`image_max_tokens`) allows, and that image's embeddings (see `vision_bytes`);
- and what this process already holds (Python, the libraries).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...gguf_header import TensorInfo
from .errors import ChatError
from .modelfile import ModelFile, mtp_output_tensor
from .repack import copy_bytes, cpu_features, repacked
from .state_cache import READ_BACK
from ...system import available_ram, current_rss

VOCAB_BYTES_PER_TOKEN = 430
F16, F32 = 2, 4
CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this
GIB = 1024 ** 3
MIB = 1024 ** 2
CONTEXT_OVERHEAD = 12 * MIB
THREAD_OVERHEAD = 4 * MIB


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # the loaded tensors as in the file: mapped from it, or read into memory (`mapped`)
    repacked: int  # anonymous copies made by AMX and CPU_REPACK
    weights_idle: int  # the part of mapped `weights` only read to make a copy (reclaimable)
    vocab: int
    kv_cache: int
    recurrent: int
    checkpoints: int
    buffers: int
    process: int
    n_ctx: int
    drafting: int = 0  # speculative decoding's share (see the module docstring)
    vision: int = 0  # the mmproj's weights and image buffers (0: no vision tower)
    image_max_tokens: int = 0
    mapped: bool = True  # llama.cpp maps the file (see maps_weights)

    @property
    def total(self) -> int:
        """Resident memory of the process once loaded and running: its peak."""
        return (self.weights + self.repacked + self.vocab + self.kv_cache + self.recurrent + self.checkpoints
                + self.buffers + self.drafting + self.vision + self.process)

    @property
    def to_load(self) -> int:
        return self.total - self.process

    @property
    def needed(self) -> int:
        """What loading needs the machine to hold: the idle mapped originals of repacked weights are
        clean page cache the kernel drops when memory runs short."""
        return self.to_load - self.weights_idle

    def describe(self) -> str:
        weights = [("weights", self.weights - self.weights_idle)]
        if self.repacked:
            weights.append(("repacked weights", self.repacked))
        parts = weights + [("vocabulary", self.vocab),
                 (f"KV cache for {self.n_ctx} tokens", self.kv_cache),
                 ("recurrent state + checkpoints", self.recurrent + self.checkpoints), ("buffers", self.buffers)]
        if self.drafting:
            parts.append(("MTP head + rollback snapshots", self.drafting))
        if self.vision:
            parts.append((f"vision tower + buffers for {self.image_max_tokens}-token images", self.vision))
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


def _block(name: str) -> str:
    return name[:name.find(".", 4) + 1]


def mtp_tensors(mf: ModelFile) -> dict[str, TensorInfo]:
    """The multi-token-prediction layers' tensors (loaded only for speculative decoding)."""
    n_layer = mf.arch_key("block_count", 0)
    mtp = {f"blk.{i}." for i in range(n_layer - mf.arch_key("nextn_predict_layers", 0), n_layer)}
    return {t.name: t for t in mf.tensors if _block(t.name) in mtp}


def loaded_tensors(mf: ModelFile, mtp: bool = False) -> dict[str, TensorInfo]:
    """The tensors llama.cpp loads: all but the multi-token-prediction layers, unless `mtp`."""
    skipped = {} if mtp else mtp_tensors(mf)
    return {t.name: t for t in mf.tensors if t.name not in skipped}


def layout(features: frozenset[str], name: str, t: TensorInfo) -> str | None:
    """The layout llama.cpp repacks weight `name` (with t's type and shape) into, or None."""
    return repacked(features, name, t.ggml_type.name, tuple(reversed(t.shape)))


def repacked_tensors(mf: ModelFile, features: frozenset[str], mtp: bool = False) -> dict[str, str]:
    """The weights llama.cpp repacks and their layouts, named as its load log names them: a tied
    output projection (the embedding's data loaded a second time, as a MUL_MAT weight) goes by the
    embedding's name, which is otherwise never repacked (it is read with GET_ROWS). `mtp`: with the
    multi-token-prediction layers loaded."""
    tensors = loaded_tensors(mf, mtp)
    found = {name: layout(features, name, t) for name, t in tensors.items()}
    embd = tensors.get("token_embd.weight")
    if "output.weight" not in tensors and embd:
        found["token_embd.weight"] = layout(features, "output.weight", embd)
    return {name: found_layout for name, found_layout in found.items() if found_layout}


def weight_bytes(mf: ModelFile, features: frozenset[str], mtp: bool = False) -> tuple[int, int, int]:
    """(mapped, repacked, idle): bytes of the loaded tensors, of the copies AMX and CPU_REPACK make of
    them, and of the mapped originals only read to make those copies (not the tied embedding's:
    the token lookup keeps reading it)."""
    tensors = loaded_tensors(mf, mtp)
    copies = repacked_tensors(mf, features, mtp)
    repacked_bytes = sum(copy_bytes(found, tensors[name].ggml_type.name, tuple(reversed(tensors[name].shape)),
                                    tensors[name].nbytes) for name, found in copies.items())
    idle = sum(tensors[name].nbytes for name in copies if name != "token_embd.weight")
    return sum(t.nbytes for t in tensors.values()), repacked_bytes, idle


# mtmd's compute buffer, per image patch, in f32 values: about 7 of the tower's widths (its peak is
# in attention: the fused qkv output, its per-head copies, the result) plus the patch's pixels
# (3 × patch²). An upper bound fitted to llama.cpp's "compute buffer size" for 12-1024-token images
# at widths 64 (the test fixture), 768 (0.8B-4B) and 1152 (9B-35B): over by 1%, 23% and 15%.
# Flash attention on, mtmd's default on a CPU (without it the buffer grows with patches²).
VISION_WIDTHS_PER_PATCH = 7


def image_compute_bytes(mmproj: ModelFile, n_tokens: int) -> int:
    """mtmd's compute buffer for encoding an image of `n_tokens` tokens (spatial_merge² patches each)."""
    meta = mmproj.metadata
    patches = n_tokens * meta.get("clip.vision.spatial_merge_size", 2) ** 2
    per_patch = VISION_WIDTHS_PER_PATCH * meta.get("clip.vision.embedding_length", 0) \
        + 3 * meta.get("clip.vision.patch_size", 16) ** 2
    return patches * per_patch * F32


def vision_bytes(mmproj: ModelFile, image_max_tokens: int) -> int:
    """What the vision tower adds once loaded: its weights (read into memory, not mapped), the
    compute buffer of encoding the largest image the budget allows, and that image's embeddings."""
    embeddings = image_max_tokens * mmproj.metadata.get("clip.vision.projection_dim", 0) * F32
    return sum(t.nbytes for t in mmproj.tensors) + image_compute_bytes(mmproj, image_max_tokens) + embeddings


def estimate(mf: ModelFile, n_ctx: int, *, n_batch: int, n_checkpoints: int, threads: int,
             features: frozenset[str] | None = None, process: int | None = None,
             mmproj: ModelFile | None = None, image_max_tokens: int = 0, draft_tokens: int = 0,
             draft_vocab: int = 0, read_back: int = READ_BACK) -> MemoryEstimate:
    """`features`: the CPU features llama.cpp reports (default: this machine's); `process`: what
    the process holds before loading (default: this one's resident memory now); `mmproj`: the
    vision tower's header, when images may be shown, each at most `image_max_tokens` tokens;
    `draft_tokens`: speculative decoding's drafts per step (0: off), `draft_vocab` the tokens its drafts
    choose from (0: the whole vocabulary, no copy); `read_back`: the recurrent-state
    snapshots a plain context keeps (0 where memory is too short for them: see ChatSession)."""
    features = cpu_features() if features is None else features
    n_layer = mf.arch_key("block_count", 0)
    main_layers = n_layer - mf.arch_key("nextn_predict_layers", 0)
    # With speculative decoding the MTP layer's weights are loaded (and repacked) like the others.
    weights, copies, idle = weight_bytes(mf, features, mtp=draft_tokens > 0)
    mapped = maps_weights(weights, idle)
    if not mapped:  # the originals of the copies are read through a buffer, never held
        weights, idle = weights - idle, 0

    recurrent_flags = list(mf.arch_key("attention.recurrent_layers", [False] * n_layer))[:main_layers]
    n_full = recurrent_flags.count(False)
    n_ctx_cells = -(-n_ctx // CTX_PAD) * CTX_PAD
    head_kv = mf.arch_key("attention.head_count_kv", 0)
    if isinstance(head_kv, list):
        head_kv = max(head_kv)
    kv_width = head_kv * (mf.arch_key("attention.key_length", 0) + mf.arch_key("attention.value_length", 0))
    kv_cache = n_ctx_cells * n_full * kv_width * F16

    recurrent = recurrent_state_bytes(mf)
    # A context keeps read_back snapshots; a drafting one at least draft_tokens (those counted with the
    # drafting).
    snapshots = max(read_back - draft_tokens, 0) * recurrent
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
    drafting = 0
    if draft_tokens:
        mtp_kv = n_ctx_cells * kv_width * F16 * mf.arch_key("nextn_predict_layers", 0)
        # The MTP context's batch runs one attention layer and its FFN: the same per-token
        # widths as a layer of the model, without the linear-attention channels.
        mtp_compute = n_batch * F32 * (n_ff + 2 * n_embd) + n_ctx_cells * n_batch * F16
        drafting = (mtp_kv + draft_tokens * recurrent
                    + draft_tokens * mf.n_tokens * F32  # the verify's further rows of logits
                    + n_batch * n_embd * F32  # the model's hidden state of each token of a batch
                    + mtp_compute + mf.n_tokens * F32 + overhead + draft_head_bytes(mf, draft_vocab))
    return MemoryEstimate(
        weights=weights, repacked=copies, weights_idle=idle, vocab=mf.n_tokens * VOCAB_BYTES_PER_TOKEN,
        kv_cache=kv_cache, recurrent=recurrent + snapshots,
        checkpoints=n_checkpoints * recurrent, buffers=compute + output + overhead,
        process=current_rss() if process is None else process, n_ctx=n_ctx, drafting=drafting,
        vision=vision_bytes(mmproj, image_max_tokens) if mmproj else 0, image_max_tokens=image_max_tokens,
        mapped=mapped)


def draft_head_bytes(mf: ModelFile, draft_vocab: int) -> int:
    """The reduced draft's own copy of `draft_vocab` rows of the output weight (in the file's type, as
    draft_head.SubsetHead gathers them) and its logits; 0 for a draft from the whole vocabulary."""
    if not draft_vocab:
        return 0
    try:
        head = mtp_output_tensor(mf)
    except ChatError:  # no reduced draft is made (Speculator says why)
        return 0
    return draft_vocab * (head.nbytes // head.shape[0] + F32)


def maps_weights(weights: int, idle: int) -> bool:
    """Whether llama.cpp should map the file (`weights` bytes loaded, `idle` of them only read to
    make AMX or CPU_REPACK copies) rather than read it. Mapped, every weight is reclaimable page
    cache, and the copied ones' pages stay resident after loading, never read again (the loader
    unmaps only the file's ends); read, the copied ones pass through a buffer of one tensor, and
    the others are anonymous memory. So a file mostly copied (ARM boards' Q4_0/Q4_K/Q8_0 with
    dotprod, x86's Q4_0/Q4_K with AVX2, AMX's types) is read — on this project's Xeon a Q4_0
    0.8B-dimension file peaks at 846 MiB read against 1,108 MiB mapped, at the same speed; one
    mostly used in place (Q8_0 or BF16 on x86) stays mapped."""
    return 2 * idle < weights


# Profiles to suggest when a model does not fit, best quality first.
SMALLER_PROFILES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "edge-arm", "q3_k_m", "q2_k")
SMALLER_CONTEXTS = (65536, 32768, 16384, 8192, 4096, 2048)


SMALLER_IMAGE_BUDGETS = (512, 256, 128, 64)


def check_fits(mf: ModelFile, est: MemoryEstimate, available: int | None = None, *, n_batch: int, n_checkpoints: int,
               threads: int, features: frozenset[str] | None = None, mmproj: ModelFile | None = None,
               draft_tokens: int = 0, draft_vocab: int = 0) -> str | None:
    """None if the model fits in available RAM, else the reason and what would fit: a smaller
    image-token budget (with an mmproj), the largest context that fits, or the best-quality profile
    of this model that fits at this context. `mmproj`, `draft_tokens`: as given to `estimate`."""
    available = available_ram() if available is None else available
    if est.needed <= available:
        return None
    features = cpu_features() if features is None else features
    # What would fit, at the least a session needs (it does without the read-back snapshots if it must).
    again = dict(n_batch=n_batch, n_checkpoints=n_checkpoints, threads=threads, features=features,
                 process=est.process, mmproj=mmproj, image_max_tokens=est.image_max_tokens,
                 draft_tokens=draft_tokens, draft_vocab=draft_vocab, read_back=0)
    advice = []
    if mmproj is not None:
        for budget in SMALLER_IMAGE_BUDGETS:
            if budget < est.image_max_tokens and estimate(mf, est.n_ctx, **{**again, "image_max_tokens": budget}) \
                    .needed <= available:
                advice.append(f"--image-max-tokens {budget} would fit")
                break
    for n_ctx in SMALLER_CONTEXTS:
        if n_ctx < est.n_ctx and estimate(mf, n_ctx, **again).needed <= available:
            advice.append(f"--ctx-size {n_ctx} would fit")
            break
    for name in SMALLER_PROFILES:
        smaller = as_profile(mf, name)
        if smaller.size >= _tensor_data(mf):
            continue
        need = estimate(smaller, est.n_ctx, **again).needed
        if need <= available:
            advice.append(f"this model as {name.upper()} would need about {_gib(need)} "
                          f"(`qwen35 convert CHECKPOINT -q {name}`)")
            break
    if not advice:
        advice.append("a smaller Qwen3.5 model")
    return (f"this model needs about {_gib(est.needed)} ({est.describe()}) but only {_gib(available)} of RAM "
            f"is available; {'; or '.join(advice)}; or pass --force to load it anyway")


def as_profile(mf: ModelFile, profile_name: str) -> ModelFile:
    """The same model's header as `qwen35 convert -q PROFILE` would write it: each tensor re-typed
    by the profile's rules (sizes only; offsets are not meaningful)."""
    from ...convert import profiles
    from ...convert.plan import PlannedTensor

    profile = profiles.load(profile_name)
    facts = _facts(mf)
    tensors = [replace(t, ggml_type=profile.choose(PlannedTensor(t.name, t.shape, "BF16", ()), facts).type)
               for t in mf.tensors]
    smaller = replace(mf, tensors=tensors)
    return replace(smaller, size=_tensor_data(smaller))


def _tensor_data(mf: ModelFile) -> int:
    return sum(t.nbytes for t in mf.tensors)


def _facts(mf: ModelFile):
    """What profile rules condition on, from the GGUF's own metadata."""
    from ...convert.profiles import ModelFacts

    n_blocks = mf.arch_key("block_count", 0)
    recurrent = list(mf.arch_key("attention.recurrent_layers", []))[:n_blocks - mf.arch_key("nextn_predict_layers", 0)]
    heads, kv = mf.arch_key("attention.head_count", 1), mf.arch_key("attention.head_count_kv", 1)
    heads, kv = (max(x) if isinstance(x, list) else x for x in (heads, kv))
    return ModelFacts(n_blocks, tuple("linear_attention" if r else "full_attention" for r in recurrent),
                      max(1, heads // max(1, kv)), mf.arch_key("expert_count", 0) or 0,
                      all(t.name != "output.weight" for t in mf.tensors), tuple(t.name for t in mf.tensors))
