"""The chat runtime's checks as run inside emulated aarch64 (qemu-user), and natively for the logits.

    guest.py logits MODEL OUT.npy        last-token logits of a fixed prompt (the x86 side)
    guest.py chat MODEL WORKDIR          the same logits (WORKDIR/logits.npy), multi-turn reuse,
                                         save/load, memory; JSON on the last line

In `chat`, at "MEASURE <label>" on stdout the process writes its own mappings (qemu's emulated
/proc/self/maps lists only the guest's) to WORKDIR/maps-<label>.txt and waits for a line on stdin,
so the host can sum the resident size of exactly those mappings in qemu's /proc/<pid>/smaps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n"


def save_logits(session, out) -> None:
    import numpy as np

    session.decoder.evaluate(session.tokenize(PROMPT), logits=True)
    np.save(out, session.decoder.ctx.logits(-1))
    session.reset()


def logits(model: str, out: str) -> None:
    from qwen35.runtime import ChatSession

    with ChatSession(model, n_ctx=1024, threads=2, seed=1, prefill=False) as s:
        save_logits(s, out)


def measure(workdir: Path, label: str) -> None:
    (workdir / f"maps-{label}.txt").write_text(Path("/proc/self/maps").read_text())
    print(f"MEASURE {label}", flush=True)
    sys.stdin.readline()


def chat(model: str, workdir: str) -> None:
    from qwen35.runtime import ChatSession
    from qwen35.runtime.engine.memory import repacked_tensors
    from qwen35.runtime.engine.repack import cpu_features

    work = Path(workdir)
    measure(work, "before")
    s = ChatSession(model, n_ctx=1024, threads=2, seed=1, temp=0, think=False, max_tokens=8)
    save_logits(s, work / "logits.npy")
    turns = []
    for text in ("Hello there, who are you?", "Tell me about lighthouses.", "And about tides?"):
        reply = s.send(text)
        rendered = s.tokenize(s.render(add_generation_prompt=False))
        turns.append({"prompt_tokens": reply.stats["prompt_tokens"], "cached_tokens": reply.stats["cached_tokens"],
                      "context_is_rendering": s.context_tokens()[:len(rendered) - 8] == rendered[:len(rendered) - 8]})
    s.save(work / "chat.session")
    continued = s.send("One more thing?")
    s.load(work / "chat.session")
    resumed = s.send("One more thing?")
    measure(work, "after")
    features = cpu_features()
    predicted = repacked_tensors(s.model_file, features, mtp=s.speculative != "off")  # (the MTP head is loaded)
    m = s.memory
    print(json.dumps({
        "turns": turns, "continued": continued.content, "resumed": resumed.content,
        "resumed_cached_tokens": resumed.stats["cached_tokens"], "features": sorted(features), "predicted_repack": predicted,
        "estimate": {"to_load": m.to_load, "needed": m.needed, "repacked": m.repacked, "weights": m.weights,
                     "weights_idle": m.weights_idle},
    }))
    s.close()


if __name__ == "__main__":
    {"logits": logits, "chat": chat}[sys.argv[1]](*sys.argv[2:])
