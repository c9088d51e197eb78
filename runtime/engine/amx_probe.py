"""The AMX probe's child process: `python -m qwen35.runtime.engine.amx_probe MODEL BUFFER_TYPE`.

cpu.probe_in_child runs it in a process of its own because what it tests may crash natively (the GCC
12.2 build's AMX kernels: see cpu.py); its death is the verdict. It loads the model twice, without and
with the buffer type, and compares the logits of a few tokens. It lives apart from cpu.py because it
loads models: native.py asks cpu.py where weights go, so cpu.py cannot import native.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

from . import native
from .cpu import AMX, MIN_COSINE, PROBE_SINGLE_TOKENS, PROBE_TOKENS, extra_buffers


def probe(model_path: str, buffer_type: str) -> dict:
    """In the child: the model's logits for a few tokens without `buffer_type`, then with it."""
    import numpy as np

    native.init()
    names = set(name for name, _ in extra_buffers().original)
    if buffer_type != AMX:  # AMX is what crashes on some machines: a probe of another type leaves it out
        names.discard(AMX)
    logits = {}
    for label, offered in (("without", names - {buffer_type}), ("with", names)):
        extra_buffers().use(offered)
        model = native.Model(model_path, placement=False)
        ctx = native.Context(model, n_ctx=256, threads=min(4, os.cpu_count() or 1), n_batch=PROBE_TOKENS)
        try:
            tokens = [(7 + 13 * i) % model.n_vocab for i in range(PROBE_TOKENS + PROBE_SINGLE_TOKENS)]
            ctx.decode(tokens[:PROBE_TOKENS], 0)
            for i in range(PROBE_TOKENS, len(tokens)):
                ctx.decode([tokens[i]], i)
            logits[label] = ctx.logits(-1).astype(np.float64)
            print(json.dumps({"step": label, "placement": model.placement}), flush=True)
        finally:
            ctx.close()
            model.close()
    if buffer_type not in model.placement:
        return {"verdict": "ok", "detail": f"no weight of this model lands in {buffer_type}"}
    a, b = logits["without"], logits["with"]
    if not np.isfinite(b).all():
        return {"verdict": "broken", "detail": f"{buffer_type} gave non-finite logits"}
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
    if cosine < MIN_COSINE:
        return {"verdict": "broken", "detail": f"{buffer_type} changed the logits (cosine {cosine:.4f})"}
    return {"verdict": "ok", "detail": f"logits agree (cosine {cosine:.6f})"}


def main(argv: list[str]) -> int:
    if len(argv) == 2:
        if os.environ.get("QWEN35_PROBE_FAULT") == "segv":  # for the tests: a probe that dies natively
            ctypes.string_at(0)
        print(json.dumps(probe(argv[0], argv[1])), flush=True)
        return 0
    print("usage: python -m qwen35.runtime.engine.amx_probe MODEL BUFFER_TYPE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
