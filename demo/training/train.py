"""Train the qwen35 demo model: a tiny Qwen3.5 (hybrid layers, MTP head, vision tower) on the synthetic
world of corpus.py, on CPU, over a reduced vocabulary that is exactly the full one.

Reduced vocabulary (TRAINING.md): the K tokens the corpus uses (train + held-out + the 33 added tokens
of the template) have their own embedding rows; every other token shares one row w0. With tied
embeddings the full 248,320-way softmax equals a (K+1)-way softmax whose last logit is w0·h + log N
(N = the number of shared tokens), so training here is training the full model; materialize.py writes
the N copies of w0.

The MTP layer (transformers has none) is built from transformers' own modules under the release's key
names and computes what llama.cpp's qwen35 MTP graph computes:
    x = mtp.fc(concat(pre_fc_norm_embedding(embed(t+1)), pre_fc_norm_hidden(h_t)))
    x = mtp.layers.0(x)  (a full-attention decoder layer, causal over the sequence, rope at t+1's position)
    logits(t+2) = tied_output(mtp.norm(x))
with h_t the main model's last hidden state after its final norm (what llama.cpp hands the MTP context).

Usage: python -m demo.training.train --out demo/training/run [--minutes 48] [--steps N] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import corpus as C

FULL_VOCAB = 248320
ADDED_TOKENS = range(248044, 248077)
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 248056, 248057, 248053, 248054


LAYERS = 4  # the shipped model's; `--layers` trains another multiple of 4


def text_config(vocab: int = FULL_VOCAB, layers: int = LAYERS) -> dict:
    """Every matrix the quantizer sees has an input width that is a multiple of 256 (QK_K): hidden 256,
    FFN 512, linear-attention value width 2 x 128 = 256, full attention 2 heads x 256 = 512, MTP fc 512.
    Layers in the releases' pattern: 3 Gated DeltaNet, then 1 full attention (llama.cpp reads the
    pattern from full_attention_interval alone)."""
    layer_types = (["linear_attention"] * 3 + ["full_attention"]) * (layers // 4)
    return {
        "attention_bias": False, "attn_output_gate": True, "dtype": "bfloat16", "eos_token_id": 248044,
        "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu", "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 512, "layer_types": layer_types, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_num_key_heads": 1, "linear_num_value_heads": 2,
        "linear_value_head_dim": 128, "max_position_embeddings": 262144, "model_type": "qwen3_5_text",
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "num_attention_heads": 2,
        "num_hidden_layers": len(layer_types), "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True, "vocab_size": vocab,
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                            "rope_theta": 10000000, "partial_rotary_factor": 0.25},
    }


def vision_config(out_hidden: int = 256) -> dict:
    return {"depth": 2, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "in_channels": 3,
            "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": out_hidden,
            "num_position_embeddings": 64, "model_type": "qwen3_5", "hidden_act": "gelu_pytorch_tanh",
            "initializer_range": 0.02, "deepstack_visual_indexes": []}


def release_config(layers: int = LAYERS) -> dict:
    """config.json of the materialized checkpoint (full vocabulary, real special-token ids)."""
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "_name_or_path": "qwen35-demo", "text_config": text_config(layers=layers), "tie_word_embeddings": True,
            "vision_config": vision_config(), "image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD,
            "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END,
            "transformers_version": "5.2.0"}


# --- images -------------------------------------------------------------------------------------


def patchify(png: bytes) -> tuple[np.ndarray, tuple[int, int, int]]:
    """pixel_values rows and grid (t, h, w) as Qwen's image processor makes them for an image that needs no
    resize (96x96 is a multiple of 32): scaled to [0,1], normalized with mean = std = 0.5, the frame repeated
    for the temporal patch of 2, patches ordered by 2x2 merge window."""
    import io

    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    img = (img - 0.5) / 0.5
    x = img.transpose(2, 0, 1)[None].repeat(2, axis=0)  # [T=2, C, H, W]
    p, m, t = 16, 2, 2
    gh, gw = x.shape[2] // p, x.shape[3] // p
    x = x.reshape(1, t, 3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * t * p * p).copy(), (1, gh, gw)


IMAGE_TOKENS = (C.IMAGE_SIZE // 32) ** 2


# --- a faster unit-lower-triangular solve ---------------------------------------------------------

_solve_triangular = torch.linalg.solve_triangular


def _unit_lower_solve(A, B, *, upper, left=True, unitriangular=False, out=None):
    """transformers' reference Gated DeltaNet (the CPU path) solves (I + L) X = B per chunk with
    torch.linalg.solve_triangular, slow on CPU for many small batched systems. For a strictly lower L of size
    n, (I + L)^-1 = prod_j (I + (-L)^(2^j)) over 2^j < n (L is nilpotent): a few batched matmuls, the same
    result to float rounding. Other calls go to torch."""
    if upper or not left or not unitriangular or out is not None or A.shape[-1] > 128:
        return _solve_triangular(A, B, upper=upper, left=left, unitriangular=unitriangular, out=out)
    n = A.shape[-1]
    M = -A.tril(-1)
    P = torch.eye(n, dtype=A.dtype) + M
    k = 2
    while k < n:
        M = M @ M
        P = P + P @ M
        k *= 2
    return P @ B


torch.linalg.solve_triangular = _unit_lower_solve

# transformers' reference chunked Gated DeltaNet pads every sequence to chunks of 64 and computes the
# inter-chunk terms even for one chunk. For a batch of sequences of at most 64 tokens without an initial
# state (all but the tool batches), one chunk is the whole computation: out = (QK^T * D) (I + L)^-1 (beta V),
# with D the pairwise decays and L the strictly lower (beta K K^T * D). Same math, 2-8x less CPU (checked to
# 1e-7 relative, outputs and gradients, against the reference).
import transformers.models.qwen3_5.modeling_qwen3_5 as _Q  # noqa: E402

_orig_gdr = _Q.torch_chunk_gated_delta_rule



def _l2norm(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def short_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, **kwargs):
    B, T, Hk, dk = key.shape
    Hv = value.shape[-2]
    if T > 64 or initial_state is not None or output_final_state:
        return _orig_gdr(query, key, value, g=g, beta=beta, chunk_size=chunk_size, initial_state=initial_state,
                         output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                         **kwargs)
    dtype = query.dtype
    if Hk != Hv:
        query = query.repeat_interleave(Hv // Hk, dim=2)
        key = key.repeat_interleave(Hv // Hk, dim=2)
    q, k, v = (x.transpose(1, 2).float() for x in (query, key, value))
    b, gg = beta.transpose(1, 2).float(), g.transpose(1, 2).float()
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (q.shape[-1] ** -0.5)
    cum = gg.cumsum(-1)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    kt = k.transpose(-1, -2)
    M = -((k * b.unsqueeze(-1)) @ kt * decay).tril(-1)
    P = torch.eye(T) + M
    n = 2
    while n < T:
        M = M @ M
        P = P + P @ M
        n *= 2
    u = P @ (v * b.unsqueeze(-1))
    out = ((q @ kt) * decay) @ u
    return out.transpose(1, 2).to(dtype).contiguous(), None


_Q.torch_chunk_gated_delta_rule = short_gated_delta_rule



# --- the model ----------------------------------------------------------------------------------


class MTP(nn.Module):
    """The release's `mtp.*` block (state-dict keys: fc.weight, pre_fc_norm_embedding.weight,
    pre_fc_norm_hidden.weight, layers.0.*, norm.weight)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(h, eps=cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(h, eps=cfg.rms_norm_eps)
        full = cfg.layer_types.index("full_attention")
        self.layers = nn.ModuleList([Qwen3_5DecoderLayer(cfg, full)])
        self.norm = Qwen3_5RMSNorm(h, eps=cfg.rms_norm_eps)
        nn.init.normal_(self.fc.weight, std=cfg.initializer_range)

    def forward(self, embeds_next, hidden, position_embeddings, cache=None, mask=None):
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds_next), self.pre_fc_norm_hidden(hidden)], dim=-1))
        for layer in self.layers:
            x = layer(x, position_embeddings=position_embeddings, attention_mask=mask, cache=cache)
        return self.norm(x)


def repeat_cache(cache, batch: int):
    """A batch-1 cache (computed without gradients) repeated to `batch` rows, in place."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.ndim > 0:
                setattr(layer, name, t.repeat(batch, *([1] * (t.ndim - 1))))
        for name in ("conv_states", "recurrent_states"):
            d = getattr(layer, name, None)
            if isinstance(d, dict):
                for i, t in d.items():
                    if isinstance(t, torch.Tensor):
                        d[i] = t.repeat(batch, *([1] * (t.ndim - 1)))
        if hasattr(layer, "update_recurrent_state"):
            # The suffix pass reads the repeated state under autograd: the new state must not be copied into
            # it in place (the cache is not used after that pass).
            layer.update_recurrent_state = lambda states, state_idx=0, **kw: (
                states if isinstance(states, torch.Tensor) else states[-1])
    return cache


VISION = "hf.model.visual."  # the vision tower's parameters (patch embedding, blocks, merger)


PARTS = ("all", "vision", "text")  # --train: everything; the vision tower; all but the vision tower


def learning_parameters(model: nn.Module, part: str = "all") -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs a run of `--train part` updates; the others are frozen. Frozen ones
    stay out of the optimizer too: its weight decay would otherwise move them."""
    if part not in PARTS:
        raise ValueError(f"--train takes one of {', '.join(PARTS)}, not {part!r}")
    chosen = [(n, p) for n, p in model.named_parameters()
              if part == "all" or (part == "vision") == n.startswith(VISION)]
    names = {n for n, _ in chosen}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return chosen


def optimizer(learning: list[tuple[str, nn.Parameter]], lr: float) -> torch.optim.Optimizer:
    decay = [p for _, p in learning if p.ndim >= 2]
    no_decay = [p for _, p in learning if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


class DemoModel(nn.Module):
    def __init__(self, kept: list[int], layers: int = LAYERS) -> None:
        super().__init__()
        self.n_layers = layers
        from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

        self.kept = kept
        self.k = len(kept)
        self.n_shared = FULL_VOCAB - self.k
        full_to_reduced = {t: i for i, t in enumerate(kept)}
        cfg = release_config(layers)
        cfg["text_config"] = text_config(self.k + 1, layers)
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            cfg[key] = full_to_reduced[cfg[key]]
        cfg["text_config"]["eos_token_id"] = full_to_reduced[248044]
        config = Qwen3_5Config(**cfg)
        self.hf = Qwen3_5ForConditionalGeneration(config).float()
        self.mtp = MTP(self.hf.config.text_config).float()
        self.register_buffer("log_n", torch.tensor(math.log(self.n_shared)), persistent=False)
        self._init_decay()

    def _init_decay(self) -> None:
        """Gated DeltaNet forgets its state by exp(-A * softplus(a + dt_bias)) per token. transformers
        initializes dt_bias = 1 and A in [0.01, 16], so most heads start keeping ~1 token of state and a
        tiny model trained briefly never learns to carry anything across a sentence. Mamba-2's init (which
        the Gated DeltaNet paper follows): A in [1, 16], dt log-uniform in [0.001, 0.1] through the inverse
        softplus, so the initial per-token retention spans exp(-1.6) .. exp(-0.001)."""
        with torch.no_grad():
            for layer in self.hf.model.language_model.layers:
                attn = getattr(layer, "linear_attn", None)
                if attn is None:
                    continue
                n = attn.A_log.numel()
                attn.A_log.copy_(torch.empty(n).uniform_(1, 16).log())
                dt = torch.exp(torch.empty(n).uniform_(math.log(1e-3), math.log(1e-1)))
                attn.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    @property
    def embed(self) -> nn.Embedding:
        return self.hf.model.language_model.embed_tokens

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = h @ self.embed.weight.t()
        bias = torch.zeros(self.k + 1, dtype=out.dtype)
        bias[-1] = self.log_n
        return out + bias

    def forward(self, ids, pixel_values=None, grid=None, mm_types=None):
        inner = self.hf.model
        if pixel_values is not None:
            pos = inner.compute_3d_position_ids(input_ids=ids, inputs_embeds=None, image_grid_thw=grid,
                                                mm_token_type_ids=mm_types)
        else:
            pos = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
        out = inner(input_ids=ids, position_ids=pos, pixel_values=pixel_values, image_grid_thw=grid,
                    mm_token_type_ids=mm_types, use_cache=False)
        h = out.last_hidden_state  # after the final norm
        # MTP: position j pairs h_j with token j+1 (at j+1's position) and predicts token j+2.
        pe = inner.language_model.rotary_emb(h, pos[:, :, 1:])
        hm = self.mtp(self.embed(ids[:, 1:]), h[:, :-1], pe)
        return h, hm

    def forward_prefixed(self, prefix, ids):
        """The same as forward(cat(prefix, ids[b]) for each row b), for a text-only batch whose rows share
        `prefix` (the tools system prompt): the prefix is evaluated once, without gradients, and its states
        (main model and MTP layer) are repeated for the batch. Returns the suffix's h and MTP states."""
        from transformers import DynamicCache

        inner = self.hf.model
        lm = inner.language_model
        tcfg = self.hf.config.text_config
        B, T = ids.shape
        L = prefix.shape[0]
        pos_p = torch.arange(L).view(1, 1, -1).expand(3, 1, -1)
        with torch.no_grad():
            cache = DynamicCache(config=tcfg)
            hp = lm(input_ids=prefix[None], position_ids=pos_p, cache=cache, use_cache=True).last_hidden_state
            mtp_cache = DynamicCache(config=tcfg)
            self.mtp(self.embed(prefix[None, 1:]), hp[:, :-1], lm.rotary_emb(hp, pos_p[:, :, 1:]), cache=mtp_cache)
        repeat_cache(cache, B)
        repeat_cache(mtp_cache, B)
        pos = (torch.arange(T) + L).view(1, 1, -1).expand(3, B, -1)
        h = lm(input_ids=ids, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
        hidden = torch.cat([hp[:, -1:].expand(B, 1, -1), h[:, :-1]], dim=1)
        # the suffix sees every cached prefix entry (L - 1 of them) and itself causally
        mask = torch.cat([torch.ones(T, L - 1, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
        hm = self.mtp(self.embed(ids), hidden, lm.rotary_emb(h, pos), cache=mtp_cache, mask=mask[None, None])
        return h, hm


def loss_fn(model: DemoModel, ids, mask, prefix=None, **kw):
    if prefix is not None:
        # h[:, j] predicts ids[:, j+1]; hm[:, j] (h_{j-1} with ids[j]) predicts ids[:, j+1] too.
        h, hm = model.forward_prefixed(prefix, ids)
        m = mask[:, 1:].bool()
        main = F.cross_entropy(model.logits(h[:, :-1][m]), ids[:, 1:][m])
        mtp = F.cross_entropy(model.logits(hm[:, :-1][m]), ids[:, 1:][m])
        return main, mtp
    h, hm = model(ids, **kw)
    tgt = ids[:, 1:]
    m = mask[:, 1:].bool()
    main = F.cross_entropy(model.logits(h[:, :-1][m]), tgt[m])
    tgt2 = ids[:, 2:]
    m2 = mask[:, 2:].bool()
    mtp = F.cross_entropy(model.logits(hm[:, :-1][m2]), tgt2[m2])
    return main, mtp


# --- data ---------------------------------------------------------------------------------------


def prepare(seed: int, tokenizer_dir: Path, shares: dict[str, float] | None = None):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    template = C.load_template()
    train, heldout = C.build(seed, shares=shares)
    enc = lambda s: C.tokenize_sample(tok, template, s, IMAGE_TOKENS)
    train_t = [(enc(s), s) for s in train]
    held_t = [(enc(s), s) for s in heldout]
    used = set(ADDED_TOKENS)
    for (ids, _), _ in train_t + held_t:
        used.update(ids)
    train_used = set(ADDED_TOKENS)
    for (ids, _), _ in train_t:
        train_used.update(ids)
    unseen = sorted(used - train_used)
    kept = sorted(used)
    return tok, train_t, held_t, kept, unseen


FRESH_SEED = 10_000  # fresh worlds: seed + FRESH_SEED + epoch (training: seed; held out: seed + 1000)


def fresh_conversations(seed: int, n: int, tok, lut: np.ndarray, shared_row: int, base_seed: int = 0,
                        shares: dict[str, float] | None = None, kinds: tuple[str, ...] | None = None):
    """`n` tokenized new conversations (corpus.fresh), as `prepare` gives the training set, less
    those that use a token the model has no row for (a new town may be spelled in pieces no
    training conversation had)."""
    template = C.load_template()
    items = [(C.tokenize_sample(tok, template, s, IMAGE_TOKENS), s)
             for s in C.fresh(seed, n, base_seed, shares, kinds)]
    kept = [item for item in items if not (lut[np.asarray(item[0][0])] == shared_row).any()]
    print(f"fresh conversations (world {seed}): {len(kept)} of {len(items)} "
          f"({len(items) - len(kept)} use a token without a row)", flush=True)
    return kept


def make_batches(items, token_budget: int, rng: random.Random, prefix_len: int = 0):
    """Length-bucketed batches of at most `token_budget` padded tokens; tool conversations (which share the
    tools system prompt, evaluated once per batch) are batched apart, counted without that prefix."""
    def length(i):
        return len(items[i][0][0]) - (prefix_len if items[i][1].tools else 0)

    batches = []
    for group in (True, False):
        idx = [i for i in range(len(items)) if bool(items[i][1].tools) == group]
        order = sorted(idx, key=lambda i: (length(i), rng.random()))
        cur, longest = [], 0
        for i in order:
            n = length(i)
            if cur and max(longest, n) * (len(cur) + 1) > token_budget:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(items, idx, lut: np.ndarray, pixel_cache: dict, prefix: list[int] | None = None):
    cut = len(prefix) if prefix is not None and items[idx[0]][1].tools else 0
    T = max(len(items[i][0][0]) - cut for i in idx)
    ids = np.zeros((len(idx), T), np.int64)
    ids[:] = lut[248044]  # right padding: causal layers never read it, and it carries no loss
    mask = np.zeros((len(idx), T), np.int64)
    pixels, grids = [], []
    for r, i in enumerate(idx):
        (toks, m), s = items[i]
        if cut:
            assert toks[:cut] == prefix and not any(m[:cut])
            toks, m = toks[cut:], m[cut:]
        ids[r, :len(toks)] = lut[np.asarray(toks)]
        mask[r, :len(m)] = m
        for png in s.images:
            key = id(png)
            if key not in pixel_cache:
                pixel_cache[key] = patchify(png)
            pv, g = pixel_cache[key]
            pixels.append(pv)
            grids.append(g)
    kw = {}
    ids_t = torch.from_numpy(ids)
    if cut:
        kw = dict(prefix=torch.from_numpy(lut[np.asarray(prefix)]))
    elif pixels:
        kw = dict(pixel_values=torch.from_numpy(np.concatenate(pixels)), grid=torch.tensor(grids),
                  mm_types=(ids_t == int(lut[IMAGE_PAD])).int())
    return ids_t, torch.from_numpy(mask), kw


def shared_prefix(items) -> list[int]:
    """The longest token prefix all tool conversations share, cut after its last <|im_end|>\n."""
    seqs = [toks for (toks, _), s in items if s.tools]
    n = min(len(t) for t in seqs)
    first = seqs[0]
    L = next((j for j in range(n) if any(t[j] != first[j] for t in seqs)), n)
    while L > 0 and first[L - 1] != 198:  # end on the newline after <|im_end|>
        L -= 1
    return first[:L]


# --- saving -------------------------------------------------------------------------------------


def release_state_dict(model: DemoModel) -> dict[str, torch.Tensor]:
    """The trained tensors under the release's key names (embedding: the K kept rows + the shared row)."""
    sd = {}
    for k, v in model.hf.state_dict().items():
        if k == "lm_head.weight":  # tied
            continue
        sd[k] = v
    for k, v in model.mtp.state_dict().items():
        sd["mtp." + k] = v
    return sd


F32_KEYS = ("linear_attn.A_log", "linear_attn.norm.weight")


def save_compact(model: DemoModel, out_dir: Path, meta: dict) -> None:
    """demo/weights layout: weights.safetensors (bf16; A_log and the gated norm F32, as in the release) +
    manifest.json."""
    import hashlib

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in release_state_dict(model).items():
        v = v.detach().contiguous()
        sd[k] = v.float() if k.endswith(F32_KEYS) else v.to(torch.bfloat16)
    path = out_dir / "weights.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {"format": "qwen35-demo compact weights v1",
                "embedding": "model.language_model.embed_tokens.weight holds the rows of kept_token_ids in order, "
                             "then one row shared by every other token of the 248320-token vocabulary",
                "kept_token_ids": model.kept, "files": {"weights.safetensors": sha},
                "config": release_config(model.n_layers), **meta}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


# The matrices that write a layer's result into the residual stream: zero, the layer adds nothing.
RESIDUAL_WRITERS = ("linear_attn.out_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight")


def grow(model: DemoModel, saved: dict) -> int:
    """Fill `saved` (a state dict of a model with fewer layers) with the layers it lacks: freshly
    initialized, but with every residual writer zero, so the grown model computes exactly what the saved
    one did (the final norm and the MTP head read the same residual stream) and training then finds a
    use for the new layers. Returns how many layers were added."""
    mine = model.state_dict()
    prefix = "hf.model.language_model.layers."
    added = set()
    for key, value in mine.items():
        if key.startswith(prefix) and key not in saved:
            saved[key] = torch.zeros_like(value) if key.endswith(RESIDUAL_WRITERS) else value.clone()
            added.add(key[len(prefix):].split(".")[0])
    return len(added)


def load_resume(path: Path, weights: Path) -> tuple[dict, dict | None]:
    """What a run continues: a trainer's last.pt (model, optimizer and the record of its run and
    the runs before it), or a compact weights directory such as demo/weights itself (its bf16
    tensors as the model, the optimizer afresh, its manifest). Returns ({"model", "step", "kept"[,
    "optimizer"]}, that manifest or None)."""
    if path.is_dir():
        from safetensors.torch import load_file

        manifest = json.loads((path / "manifest.json").read_text())
        sd = {}
        for key, value in load_file(str(path / "weights.safetensors")).items():
            sd[key if key.startswith("mtp.") else "hf." + key] = value.float()
        sd["hf.lm_head.weight"] = sd["hf.model.language_model.embed_tokens.weight"]  # tied
        return {"model": sd, "step": manifest["steps"], "kept": manifest["kept_token_ids"]}, manifest
    state = torch.load(path, weights_only=False)
    manifest = state.pop("meta", None)  # what the run that saved it records of itself and its runs before
    manifest_path = weights / "manifest.json"
    if manifest is None and manifest_path.is_file():  # (a last.pt saved before it carried them)
        manifest = json.loads(manifest_path.read_text())
    state.setdefault("kept", manifest and manifest.get("kept_token_ids"))
    return state, manifest


# --- main ---------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("demo/training/run"))
    ap.add_argument("--weights", type=Path, default=Path("demo/weights"), help="where the compact weights go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--minutes", type=float, default=0, help="stop (and save) after this wall time")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--order-seed", type=int, default=None, help="seed of the batch order (default: --seed)")
    ap.add_argument("--layers", type=int, default=LAYERS,
                    help="decoder layers, a multiple of 4 (3 Gated DeltaNet + 1 full attention each); resuming a "
                         "model with fewer grows it: the new layers start as the identity")
    ap.add_argument("--resume", type=Path, help="continue from a last.pt (model, and optimizer when saved) or "
                                                 "from a compact weights directory (demo/weights)")
    ap.add_argument("--mix", default="", metavar="KIND=SHARE,...",
                    help="other shares of the training set for some kinds (e.g. image=0.4,count=0.15; the rest "
                         "keep corpus.KINDS' shares, all relative); the held-out set is unchanged")
    ap.add_argument("--train", choices=PARTS, default="all",
                    help="what learns: everything; only the vision tower, on the conversations with an image (the "
                         "language model and the MTP head stay exactly as resumed); or all but the vision tower")
    ap.add_argument("--fresh", action="store_true",
                    help="every epoch new conversations (new made-up towns and pictures, the same held-out splits: "
                         "corpus.fresh); --train vision does so from its second epoch")
    args = ap.parse_args(argv)
    try:
        shares = {k.strip(): float(v) for k, v in (part.split("=") for part in args.mix.split(",") if part.strip())}
    except ValueError:
        raise SystemExit(f"--mix takes KIND=SHARE pairs separated by commas, not {args.mix!r}") from None
    try:
        C.mix(shares)  # (checked before the corpus is built)
    except ValueError as e:
        raise SystemExit(f"--mix: {e}") from None
    if args.train != "all" and not args.resume:
        raise SystemExit(f"--train {args.train} continues a model: give --resume")
    if args.resume and not args.resume.exists():
        raise SystemExit(f"--resume: {args.resume} does not exist")
    if args.layers < 4 or args.layers % 4:
        raise SystemExit(f"--layers must be a multiple of 4, not {args.layers}")
    command = "python -m demo.training.train " + " ".join(sys.argv[1:] if argv is None else argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed if args.order_seed is None else args.order_seed)
    np.random.seed(args.seed)
    wall0, cpu0 = time.time(), time.process_time()
    args.out.mkdir(parents=True, exist_ok=True)

    tokdir = args.out / "tokenizer"
    if not (tokdir / "tokenizer.json").is_file():
        from qwen35.demo.real_vocab import write_tokenizer_files

        tokdir.mkdir(parents=True, exist_ok=True)
        write_tokenizer_files(tokdir)
    tok, train, held, kept, unseen = prepare(args.seed, tokdir, shares)
    if args.train == "vision":
        # The corpus is built whole, so that its vocabulary (and so the resumed model's rows) is unchanged;
        # only the conversations that show an image can teach the vision tower anything.
        train = [t for t in train if t[1].images]
    print(f"corpus: {len(train)} train, {len(held)} held-out conversations; K = {len(kept)} kept tokens; "
          f"held-out tokens not in train: {[tok.decode([t]) for t in unseen]}", flush=True)
    prefix = shared_prefix(train + held)
    print(f"tool conversations share a {len(prefix)}-token prefix (evaluated once per batch)", flush=True)
    lut = np.full(FULL_VOCAB, len(kept), np.int64)
    lut[np.asarray(kept)] = np.arange(len(kept))

    model = DemoModel(kept, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M (reduced vocabulary)", flush=True)
    learning = learning_parameters(model, args.train)
    if args.train != "all":
        print(f"learning: {sum(p.numel() for _, p in learning) / 1e6:.2f} M parameters ({args.train})", flush=True)
    opt = optimizer(learning, args.lr)
    deadline = wall0 + args.minutes * 60 if args.minutes else None
    start_step = 0
    previous_runs = []
    if args.resume:
        state, prev_manifest = load_resume(args.resume, args.weights)
        old_kept = state["kept"]
        if old_kept != kept:
            # A corpus that uses more tokens: the embedding (tied to the output) gets rows for them, each
            # starting as the shared row those tokens had, so the resumed model computes exactly what
            # the saved one did. Adam's moments are per row: the optimizer starts afresh.
            where = {t: i for i, t in enumerate(old_kept)}
            index = torch.tensor([where.get(t, len(old_kept)) for t in kept] + [len(old_kept)])
            for key in [k for k in state["model"] if k.endswith(("embed_tokens.weight", "lm_head.weight"))]:
                state["model"][key] = state["model"][key][index].clone()
            state.pop("optimizer", None)
            print(f"vocabulary {len(old_kept)} -> {len(kept)} kept tokens: new rows start as the shared one", flush=True)
        grown = grow(model, state["model"])
        if grown:
            state.pop("optimizer", None)
            print(f"grown to {args.layers} layers: {grown} new layers start as the identity", flush=True)
        model.load_state_dict(state["model"])
        if "optimizer" in state and args.train == "all":  # (another set of learning parameters: afresh)
            opt.load_state_dict(state["optimizer"])
        start_step = state["step"]
        print(f"resumed from {args.resume} at step {start_step}", flush=True)
        if prev_manifest is not None:  # the runs this one continues, as the manifest records them
            old = prev_manifest
            previous_runs = old.get("previous_runs", []) + [
                {k: v for k, v in old.items() if k not in ("config", "kept_token_ids", "files", "previous_runs",
                                                          "format", "embedding", "total_cpu_seconds",
                                                          "total_wall_seconds")}]
    warmup = min(40, args.steps // 10)
    t_warm = 0.0

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        prog = (step - warmup) / max(1, args.steps - warmup)
        if deadline:  # a time budget: the schedule follows the clock, whichever ends first
            prog = max(prog, (time.time() - wall0 - t_warm) / max(1.0, deadline - wall0 - t_warm))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    # held-out loss batches (fixed)
    held_batches = make_batches(held, args.token_budget, random.Random(1), len(prefix))[:6]
    pixel_cache: dict = {}

    def held_loss():
        model.eval()
        tot = np.zeros(2)
        with torch.no_grad():
            for b in held_batches:
                ids, mask, kw = collate(held, b, lut, pixel_cache, prefix)
                a, m = loss_fn(model, ids, mask, **kw)
                tot += [a.item(), m.item()]
        model.train()
        return tot / len(held_batches)

    step, epoch, batches, skipped = 0, 0, [], 0
    hist = []
    t_last = time.time()
    meta = {}
    while step < args.steps:
        if not batches:
            if args.fresh or (epoch and args.train == "vision"):
                # New conversations every epoch (corpus.fresh): 2,800 pictures learnt 14 times over taught
                # it those (train loss 0.03 -> 0.016) and named one held-out picture more of 40 (run 13).
                train = fresh_conversations(args.seed + FRESH_SEED + epoch, len(train), tok, lut, len(kept),
                                            args.seed, shares, C.IMAGE_KINDS if args.train == "vision" else None)
                pixel_cache.clear()  # (keyed by the PNG objects' ids, which new ones may take)
            batches = make_batches(train, args.token_budget, rng, len(prefix))
            epoch += 1
        b = batches.pop()
        ids, mask, kw = collate(train, b, lut, pixel_cache, prefix)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        main_l, mtp_l = loss_fn(model, ids, mask, **kw)
        loss = main_l + args.mtp_weight * mtp_l
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in learning], 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            # One batch's overflow must not poison the weights (Adam's moments keep a NaN forever).
            skipped += 1
            print(f"step {step}: non-finite loss or gradient, batch skipped ({skipped} so far)", flush=True)
            if skipped > 50:
                raise SystemExit("training diverged: more than 50 non-finite batches")
            continue
        opt.step()
        step += 1
        if step == warmup:
            t_warm = time.time() - wall0
        hist.append((main_l.item(), mtp_l.item(), ids.numel()))
        if step % args.log_every == 0:
            h = np.array(hist[-args.log_every:])
            dt = time.time() - t_last
            t_last = time.time()
            print(f"step {step} epoch {epoch} lr {lr_at(step):.2e} loss {h[:, 0].mean():.4f} mtp {h[:, 1].mean():.4f} "
                  f"tok/s {h[:, 2].sum() / dt:.0f} wall {time.time() - wall0:.0f}s", flush=True)
        done = step >= args.steps or (deadline and time.time() > deadline)
        if step % args.save_every == 0 or done:
            hl = held_loss()
            h = np.array(hist[-50:])
            meta = {"command": command, "seed": args.seed, "steps": start_step + step, "epochs": epoch,
                    "train_loss": round(float(h[:, 0].mean()), 4), "train_mtp_loss": round(float(h[:, 1].mean()), 4),
                    "heldout_loss": round(float(hl[0]), 4), "heldout_mtp_loss": round(float(hl[1]), 4),
                    "cpu_seconds": round(time.process_time() - cpu0, 1), "wall_seconds": round(time.time() - wall0, 1),
                    "threads": args.threads, "parameters_reduced_vocab": n_params,
                    "torch": torch.__version__, "transformers": __import__("transformers").__version__}
            if previous_runs:
                meta["previous_runs"] = previous_runs
                meta["total_cpu_seconds"] = round(meta["cpu_seconds"] + sum(r["cpu_seconds"] for r in previous_runs), 1)
                meta["total_wall_seconds"] = round(meta["wall_seconds"] + sum(r["wall_seconds"] for r in previous_runs), 1)
            print(f"save at step {step}: held-out loss {hl[0]:.4f} mtp {hl[1]:.4f}", flush=True)
            save_compact(model, args.weights, meta)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": start_step + step,
                        "kept": kept, "meta": meta},  # (its runs, for a run that resumes from it)
                       args.out / "last.pt")
        if done:
            break
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"done: {step} steps, wall {time.time() - wall0:.0f} s, CPU {time.process_time() - cpu0:.0f} s "
          f"(user {ru.ru_utime:.0f} s, sys {ru.ru_stime:.0f} s)", flush=True)
    print(json.dumps(meta), flush=True)


if __name__ == "__main__":
    main()
