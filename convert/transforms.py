"""The numeric and layout transforms between a Qwen3.5 checkpoint and llama.cpp, as pure functions.

Each is small and tested on hand-made numbers (tests/test_transforms.py). Value transforms take and
return float32 arrays; layout transforms return index arrays (which source row or column lands where),
so the reader can move raw BF16 bits without ever widening them.
Facts read from llama.cpp's loader (src/models/qwen35.cpp in the pinned sdist).
"""

from __future__ import annotations

import numpy as np


def neg_exp(a_log: np.ndarray) -> np.ndarray:
    """ssm_a = -exp(A_log): llama.cpp's gated delta net takes the decay rate itself, in F32.

    Computed in float64 and rounded once: numpy's float32 exp is off by one ulp on ~40% of inputs,
    where torch's (which transformers uses) is correctly rounded almost always.
    """
    return (-np.exp(a_log.astype(np.float64))).astype(np.float32)


def plus_one(weight: np.ndarray) -> np.ndarray:
    """Qwen3.5's RMSNorm computes x̂·(1 + w); llama.cpp computes x̂·w."""
    return weight.astype(np.float32, copy=False) + np.float32(1.0)


def tiled_value_heads(n_key_heads: int, n_value_heads: int) -> np.ndarray:
    """Old value-head index for each new position, grouped (HF) → tiled (ggml) order.

    HF gives value head h to key head h // r (r = Lv/Lk); ggml's broadcast gives it key head h % Lk.
    New position j·Lk + k holds old head k·r + j.
    """
    if n_value_heads % n_key_heads:
        raise ValueError(f"{n_value_heads} value heads do not divide into {n_key_heads} key heads")
    ratio = n_value_heads // n_key_heads
    return np.arange(n_value_heads).reshape(n_key_heads, ratio).T.reshape(-1)


def expand_heads(head_order: np.ndarray, head_dim: int) -> np.ndarray:
    """A head permutation as a permutation of the head_dim-sized blocks it moves."""
    return (head_order[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def qkv_rows(key_dim: int, head_order: np.ndarray, head_dim: int) -> np.ndarray:
    """Row order of in_proj_qkv / conv1d channels: [Q ‖ K] untouched, V heads permuted."""
    return np.concatenate([np.arange(2 * key_dim), 2 * key_dim + expand_heads(head_order, head_dim)])


def fused_expert_rows(n_experts: int, ffn_length: int, part: int) -> np.ndarray:
    """Rows of gate_up_proj seen as [E·2Fe, H] that hold the gate (part 0) or up (part 1) of every expert."""
    starts = np.arange(n_experts) * 2 * ffn_length + part * ffn_length
    return (starts[:, None] + np.arange(ffn_length)).reshape(-1)


def runs(index: np.ndarray) -> list[tuple[int, int]]:
    """An index array as [start, stop) runs of consecutive indices, for few large reads."""
    index = np.asarray(index, dtype=np.int64)
    if index.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [index.size]])
    return [(int(index[a]), int(index[b - 1]) + 1) for a, b in zip(starts, stops)]


def temporal_slice_rows(shape: tuple[int, ...], t: int) -> np.ndarray:
    """Rows (of length shape[-1]) of a Conv3D weight [out, in, kt, ph, pw] that make temporal slice t,
    in order: the [out, in, ph, pw] Conv2D weight llama.cpp applies to frame t of a pair.

    llama.cpp's vision encoder runs the patch embedding as two Conv2Ds, one per frame, and adds
    them; for a still image both see the same frame, as HF's Conv3D sees a repeated one.
    """
    n_out, n_in, kt, ph, _ = shape
    if not 0 <= t < kt:
        raise ValueError(f"temporal slice {t} of a kernel {kt} deep")
    return np.arange(n_out * n_in * kt * ph).reshape(n_out, n_in, kt, ph)[:, :, t, :].reshape(-1)
