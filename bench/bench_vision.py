"""Vision benchmarks: image encoding against llama.cpp's own helper, and later turns of a chat about
an image against the same turns of a text-only chat.

1. Encoding. One image, through a ChatSession turn (the session's `image_encode_s`: decoding the
   file, mtmd's preprocessing, the tower, and decoding its embeddings into the text context) and
   through llama-cpp-python's mtmd bindings called directly as their header documents it
   (`mtmd_helper_bitmap_init_from_buf`, `mtmd_tokenize`, `mtmd_helper_eval_chunks` on the same
   image, mmproj, model and thread count, in a context of its own), in interleaved repetitions
   after a warm-up of each. Target: ours within 5% of the helper (ratio ≤ 1.05).
2. Images are encoded once. Two chats interleaved turn by turn, so that load from other processes
   hits both alike: one whose first message holds a `--image-tokens` image (default 1024), one with
   the same messages and no image. Turns 2.. must evaluate only their new text (no image tokens,
   about the prompt tokens of the text-only chat) and their time to first token must be ≤ 1.3× the
   text-only chat's. No prefill between turns, so each turn's time to first token is all the work
   its new text costs.

The model is the random-weight checkpoint with Qwen3.5-0.8B's real dimensions that bench_convert.py
builds (its vision tower too: depth 12, width 768, 2304 position embeddings), converted once to Q8_0
with an F16 mmproj and cached in the work directory.

    python bench/bench_vision.py [--threads N] [--reps 5] [--chats 3] [--workdir /tmp/qwen35-bench/vision]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench_convert import DEFAULT_CONFIG, bench_config, ensure_checkpoint

TOPICS = ["lighthouses", "tide pools", "sourdough bread", "the printing press", "glaciers", "beekeeping"]
PATCH_AND_MERGE = 32  # pixels per image token along each side (patch 16 × spatial merge 2)


def model_0_8b_with_mmproj(workdir: Path) -> tuple[Path, Path]:
    from qwen35.convert import convert
    from qwen35.convert.pipeline import mmproj_file_name

    gguf = workdir / "qwen35-0.8b-Q8_0.gguf"
    ckpt = ensure_checkpoint(workdir.parent, bench_config(DEFAULT_CONFIG, None), "qwen3.5-0.8b")
    mmproj = workdir / mmproj_file_name(ckpt.name, "f16")
    if not (gguf.is_file() and mmproj.is_file()):
        print(f"converting {ckpt} to {gguf} and {mmproj.name} …", flush=True)
        convert(ckpt, ["q8_0"], gguf, force=True, mmproj="f16")
    return gguf, mmproj


def write_image(path: Path, n_tokens: int) -> Path:
    """A square photo-like image (smooth gradients and noise) of exactly `n_tokens` image tokens,
    so mtmd neither scales it up nor down."""
    from tests.vision_fixture import write_png

    side = int(round(n_tokens ** 0.5))
    if side * side != n_tokens:
        raise SystemExit("--image-tokens must be a square (256, 576, 1024, …)")
    px = side * PATCH_AND_MERGE
    y, x = np.mgrid[0:px, 0:px] / px
    rng = np.random.default_rng(0)
    rgb = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.integers(0, 55, (px, px, 3))
    write_png(path, rgb.astype(np.uint8))
    return path


# --- 1. encoding --------------------------------------------------------------------------------


class HelperEncoder:
    """llama.cpp's mtmd helpers called directly: its own mtmd context over the session's model
    (the same weights in memory), with the same parameters as the session's, and a llama context
    of its own."""

    def __init__(self, session, mmproj: Path, image_max_tokens: int) -> None:
        from llama_cpp import mtmd_cpp as m

        from qwen35.runtime.engine import native

        self.m, self.native = m, native
        params = m.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, session.threads, False, False
        params.image_max_tokens = image_max_tokens
        self.mtmd = m.mtmd_init_from_file(str(mmproj).encode(), session.decoder.model.ptr, params)
        assert self.mtmd, "mtmd could not load the mmproj"
        self.ctx = native.Context(session.decoder.model, session.n_ctx, session.threads, session.decoder.ctx.n_batch)

    def encode(self, data: bytes) -> tuple[float, int]:
        """Seconds from the image's bytes to its embeddings decoded into the context; its tokens."""
        m = self.m
        self.ctx.clear()
        start = time.perf_counter()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bitmap = m.mtmd_helper_bitmap_init_from_buf(self.mtmd, buf, len(data), False)
        marker = m.mtmd_default_marker()
        text = m.mtmd_input_text(marker, len(marker), False, True)
        chunks = m.mtmd_input_chunks_init()
        bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert m.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(text), bitmaps, 1) == 0
        new_pos = self.native.L.llama_pos(0)
        assert m.mtmd_helper_eval_chunks(self.mtmd, self.ctx.ptr, chunks, 0, 0, self.ctx.n_batch, False,
                                         ctypes.byref(new_pos)) == 0
        seconds = time.perf_counter() - start
        n_tokens = m.mtmd_helper_get_n_tokens(chunks)
        m.mtmd_input_chunks_free(chunks)
        m.mtmd_bitmap_free(bitmap)
        return seconds, n_tokens

    def close(self) -> None:
        self.ctx.close()
        self.m.mtmd_free(self.mtmd)


def encode_comparison(model: Path, mmproj: Path, image: Path, args) -> None:
    from qwen35.runtime import ChatSession

    data = image.read_bytes()
    with ChatSession(model, n_ctx=args.image_tokens + 512, threads=args.threads, think=False, seed=1, prefill=False,
                     mmproj=mmproj, image_max_tokens=args.image_tokens, speculative="off") as chat:
        helper = HelperEncoder(chat, mmproj, args.image_tokens)
        ours, theirs = [], []
        try:
            for rep in range(args.reps + 1):  # the first of each is a warm-up
                chat.reset()
                chat.send("", [image], max_tokens=1)
                tokens = chat.stats["image_tokens"]
                seconds, their_tokens = helper.encode(data)
                assert their_tokens == tokens + 2, (their_tokens, tokens)  # + <|vision_start|>, <|vision_end|>
                if rep:
                    ours.append(chat.stats["image_encode_s"])
                    theirs.append(seconds)
                    print(f"rep {rep}: qwen35 {ours[-1]:.3f} s, mtmd_helper_eval_chunks {theirs[-1]:.3f} s", flush=True)
        finally:
            helper.close()
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"\n| encoding a {tokens}-token image | qwen35 (median / best) | mtmd_helper_eval_chunks (median / best) "
          f"| ratio of medians | ratio of bests | target |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {image.name}, {args.threads} threads, {args.reps} reps | {a:.3f} / {min(ours):.3f} s "
          f"| {b:.3f} / {min(theirs):.3f} s | {a / b:.3f} | {min(ours) / min(theirs):.3f} | ≤ 1.05 |\n")


# --- 2. later turns -------------------------------------------------------------------------------


def _message(turn: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    return f"Question {turn + 1}, about {topic}: explain how {topic} work and why people care about them. " * 3


def later_turns(model: Path, mmproj: Path, image: Path, args) -> None:
    from qwen35.runtime import ChatSession

    options = dict(n_ctx=args.image_tokens + 4096, threads=args.threads, think=False, seed=1, prefill=False,
                   max_tokens=args.answer_tokens, temp=0, mmproj=mmproj, image_max_tokens=args.image_tokens,
                   speculative="off")
    rows = [{"turn": t + 1, "image": [], "text": [], "image_prompt": 0, "text_prompt": 0, "image_tokens": 0}
            for t in range(args.turns)]
    with ChatSession(model, **options) as with_image, ChatSession(model, **options) as text_only:
        for chat in (with_image, text_only):
            chat.send("warm-up", max_tokens=2)
        for _ in range(args.chats):
            with_image.reset()
            text_only.reset()
            for turn, row in enumerate(rows):
                # Interleaved turn by turn, in alternating order, so that load hits both chats alike.
                pair = [(with_image, [image] if turn == 0 else None, "image"), (text_only, None, "text")]
                for chat, images, kind in (pair if (turn + len(row["text"])) % 2 == 0 else pair[::-1]):
                    reply = chat.send(_message(turn), images)
                    row[kind].append(reply.stats["ttft_s"])
                    row[f"{kind}_prompt"] = reply.stats["prompt_tokens"]
                    if kind == "image":
                        row["image_tokens"] = reply.stats["image_tokens"]
    print(f"| turn | image chat: evaluated (image tokens) | text-only chat: evaluated | image chat ttft | text-only ttft "
          f"| ratio | target |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for row in rows:
        a, b = statistics.median(row["image"]), statistics.median(row["text"])
        target = "" if row["turn"] == 1 else "≤ 1.3"
        if row["turn"] > 1:
            worst = max(worst, a / b)
            assert row["image_tokens"] == 0, "a later turn evaluated image tokens"
        print(f"| {row['turn']} | {row['image_prompt']} ({row['image_tokens']}) | {row['text_prompt']} | {a:.3f} s "
              f"| {b:.3f} s | {a / b:.2f} | {target} |")
    print(f"\nturns 2..{args.turns}: worst ratio of median times to first token {worst:.2f} (target ≤ 1.3), "
          f"median of {args.chats} chats, {args.answer_tokens}-token answers\n")


def main() -> None:
    from qwen35.system import physical_cores

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen35-bench/vision"))
    ap.add_argument("--image-tokens", type=int, default=1024, help="tokens of the image (a square: 256, 1024, …)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the encoding comparison")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--chats", type=int, default=3, help="repetitions of the two interleaved chats")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--skip-chat", action="store_true")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, mmproj = model_0_8b_with_mmproj(args.workdir)
    image = write_image(args.workdir / f"image-{args.image_tokens}.png", args.image_tokens)
    import llama_cpp

    print(f"model {model}, mmproj {mmproj.name}, {args.threads} threads, llama-cpp-python {llama_cpp.__version__}\n",
          flush=True)
    if not args.skip_encode:
        encode_comparison(model, mmproj, image, args)
    if not args.skip_chat:
        later_turns(model, mmproj, image, args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.vision_fixture.write_png
    main()
