"""llama.cpp's logits for a token sequence, loaded the way qwen35 loads every model (runtime.native)."""

from __future__ import annotations

import numpy as np

from qwen35.runtime.engine import native


def llama_logits(gguf_path, tokens: list[int], *, exact: bool = True, threads: int = 2) -> np.ndarray:
    """Logits at every position, [len(tokens), n_vocab] float32. `exact` (the default here: an F32
    KV cache, no flash attention) leaves only summation-order noise; llama.cpp's defaults round
    keys, values and attention through f16."""
    n = len(tokens)
    model = native.Model(str(gguf_path))
    try:
        ctx = native.Context(model, n_ctx=max(2 * n, 64), threads=threads, n_batch=n, all_logits=True,
                             exact=exact)
        try:
            ctx.decode(tokens, 0)
            return np.stack([ctx.logits(i) for i in range(n)])
        finally:
            ctx.close()
    finally:
        model.close()
