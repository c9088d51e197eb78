#!/usr/bin/env python3
"""Quality of every quantization profile on the trained demo model: KL to F32, top-1 agreement, tasks.

    python bench/bench_demo_quality.py [--workdir /tmp/qwen35-bench/demo-quality] [--limit 3]

The demo model (demo/weights) is materialized and converted once to F32 and every profile below in
one read (`Conversion`, as `qwen35 convert -q f32 -q … ` does), plus its mmproj F16. Then, per profile:

- **KL to F32 and top-1 agreement**: the held-out conversations of demo/training/corpus.py (text only,
  thinking on and off), every position, teacher-forced through llama.cpp (an F32 KV cache, no flash
  attention: the same exact setting as the parity tests). The KL is over the whole 248,320-token
  vocabulary, computed exactly from the kept tokens' logits and the one logit the other tokens share
  (their rows are equal, so they quantize alike and get equal logits).
- **Tasks**: demo/training/evaluate.py's held-out accuracies, greedy through ChatSession, `--limit`
  conversations per kind (right tool and arguments, an answer stating the tool's result, facts,
  JSON, the image's colour and shape, counts).

Prints a markdown table. Nothing is timed: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))

PROFILES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_m-hybrid", "edge-arm", "iq4_xs", "q3_k_m", "q2_k"]
TASKS = ["tool call", "answer from tool result", "fact", "fact (JSON)", "image colour+shape", "image count",
         "greeting"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def heldout_token_lists(gguf: Path, n: int) -> list[list[int]]:
    from qwen35.demo.training import corpus as C
    from qwen35.runtime.engine import native

    held = C.heldout(0)
    texts = [s for s in held if not s.images][:n]
    template = C.load_template()
    model = native.Model(str(gguf), vocab_only=True)
    try:
        return [model.tokenize(C.render_texts(template, s)[0]) for s in texts]
    finally:
        model.close()


def reduced_log_probs(gguf: Path, sequences: list[list[int]], kept: np.ndarray, shared: int) -> list[np.ndarray]:
    """Per sequence: [positions, K + 1] log-probabilities of the kept tokens and of ONE shared token
    (each of the N shared tokens has it), from full-vocabulary logits."""
    from qwen35.runtime.engine import native

    model = native.Model(str(gguf))
    out = []
    try:
        for tokens in sequences:
            ctx = native.Context(model, n_ctx=max(2 * len(tokens), 64), threads=2, n_batch=len(tokens),
                                 all_logits=True, exact=True)
            try:
                ctx.decode(tokens, 0)
                rows = []
                for i in range(len(tokens)):
                    full = log_softmax(ctx.logits(i).astype(np.float64))
                    rows.append(np.concatenate([full[kept], full[[shared]]]))
                out.append(np.stack(rows))
            finally:
                ctx.close()
    finally:
        model.close()
    return out


def kl_and_top1(p_list, q_list, n_shared: int) -> tuple[float, float]:
    kls, agree, total = [], 0, 0
    for p, q in zip(p_list, q_list):
        pk, qk = p[:, :-1], q[:, :-1]
        ps, qs = p[:, -1], q[:, -1]
        kl = (np.exp(pk) * (pk - qk)).sum(-1) + n_shared * np.exp(ps) * (ps - qs)
        kls.append(kl)
        # top-1 over the full vocabulary: a shared token wins only if its logit beats every kept one
        top_p = np.where(ps > pk.max(-1), -1, pk.argmax(-1))
        top_q = np.where(qs > qk.max(-1), -1, qk.argmax(-1))
        agree += int((top_p == top_q).sum())
        total += len(top_p)
    return float(np.concatenate(kls).mean()), agree / total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/demo-quality"))
    ap.add_argument("--limit", type=int, default=3, help="held-out conversations per kind for the task accuracies")
    ap.add_argument("--kl-conversations", type=int, default=24)
    ap.add_argument("--profiles", nargs="*", default=PROFILES)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from qwen35.convert.pipeline import Conversion
    from qwen35.demo.materialize import load_manifest, materialize
    from qwen35.demo.training.evaluate import evaluate

    manifest = load_manifest()
    ckpt = args.workdir / "checkpoint"
    stamp = ckpt / ".weights-sha256"
    sha = manifest["files"]["weights.safetensors"]
    if not stamp.is_file() or stamp.read_text() != sha:
        materialize(ckpt)
        stamp.write_text(sha)
    out = args.workdir / f"out-{sha[:12]}"
    types = ["f32", *args.profiles]
    paths = {t: out / f"qwen35-demo-{t.upper()}.gguf" for t in types}
    if not all(p.is_file() for p in paths.values()):
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        outputs = Conversion(ckpt, types, out, force=True, mmproj="f16").run(threads=2)
        paths = {o.type_name: o.path for o in outputs}
        print(f"converted {len(types)} profiles + mmproj in {time.time() - t0:.0f} s", file=sys.stderr)

    kept = np.asarray(manifest["kept_token_ids"], np.int64)
    shared = int(np.setdiff1d(np.arange(1000), kept)[0])
    n_shared = 248320 - len(kept)
    sequences = heldout_token_lists(paths["f32"], args.kl_conversations)
    reference = reduced_log_probs(paths["f32"], sequences, kept, shared)
    rows = {}
    for t in types:
        kl, top1 = (0.0, 1.0) if t == "f32" else kl_and_top1(reference, reduced_log_probs(paths[t], sequences, kept,
                                                                                           shared), n_shared)
        scores = evaluate(paths[t], limit=args.limit)["scores"]
        rows[t] = {"size_mb": round(paths[t].stat().st_size / 1e6, 1), "kl": kl, "top1": top1,
                   **{k: scores[k]["accuracy"] for k in TASKS if k in scores},
                   "n": {k: scores[k]["total"] for k in TASKS if k in scores}}
        print(f"{t}: {json.dumps(rows[t])}", file=sys.stderr, flush=True)

    n = rows["f32"]["n"]
    print(f"\nheld-out: {sum(len(s) for s in sequences)} tokens in {len(sequences)} conversations for KL; "
          f"tasks: {', '.join(f'{k} {v}' for k, v in n.items())}\n")
    print("| profile | MB | mean KL to F32 | top-1 = F32 | " + " | ".join(TASKS) + " |")
    print("|---|---|---|---|" + "---|" * len(TASKS))
    for t, r in rows.items():
        print(f"| {t} | {r['size_mb']} | {r['kl']:.2e} | {100 * r['top1']:.1f}% | "
              + " | ".join(f"{100 * r[k]:.0f}%" if k in r else "–" for k in TASKS) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
