"""Expand the compact demo weights (demo/weights) into a full Hugging Face checkpoint, exactly like a release.

The stored file holds the trained tensors under the release's key names, in the release's dtypes (BF16;
`linear_attn.A_log` and `linear_attn.norm.weight` F32), except the embedding, which holds only the rows of
the K tokens the training corpus uses (manifest `kept_token_ids`, in order) and one last row w0 shared by
every other token. Materializing writes the full 248,320-row embedding (row t = the stored row of t, or
w0); the output projection is tied to it, so the full model's softmax over N copies of w0 is exactly the
reduced model's softmax over K + 1 logits with the shared one + log N (TRAINING.md).

Only numpy, safetensors-format parsing (by hand: numpy has no bfloat16) and the standard library are
used, plus qwen35.demo.real_vocab for the tokenizer files. No torch: this runs at `qwen35 demo` time.

    python -m demo.materialize OUT_DIR [--weights demo/weights]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from .synthetic import safetensors_header

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
VOCAB = 248320
EMBED = "model.language_model.embed_tokens.weight"
_DTYPES = {"BF16": (np.uint16, 2), "F32": (np.float32, 4), "F16": (np.float16, 2)}

GENERATION_CONFIG = {"bos_token_id": 248044, "do_sample": True, "eos_token_id": [248046, 248044],
                     "pad_token_id": 248044, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                     "transformers_version": "5.2.0"}
# As a release's, but images are not upscaled below 8 merged tokens (llama.cpp's mtmd minimum), so the
# 96x96 training images reach the tower unresized in transformers as in llama.cpp.
PREPROCESSOR_CONFIG = {"image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
                       "do_resize": True, "size": {"shortest_edge": 8 * 32 * 32, "longest_edge": 16777216},
                       "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
                       "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}


class MaterializeError(RuntimeError):
    pass


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header without __metadata__, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n:]


def load_manifest(weights_dir: Path = WEIGHTS_DIR, *, verify: bool = True) -> dict:
    manifest = json.loads((weights_dir / "manifest.json").read_text())
    if verify:
        for name, sha in manifest["files"].items():
            got = hashlib.sha256((weights_dir / name).read_bytes()).hexdigest()
            if got != sha:
                raise MaterializeError(f"{weights_dir / name}: SHA-256 {got} differs from the manifest's {sha}")
    return manifest


def materialize(out_dir: Path, weights_dir: Path = WEIGHTS_DIR, *, tokenizer: bool = True) -> Path:
    """Write config.json, model.safetensors (full vocabulary), generation_config.json,
    preprocessor_config.json and (with `tokenizer`) the real tokenizer files and chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(weights_dir)
    config = manifest["config"]
    kept = np.asarray(manifest["kept_token_ids"], np.int64)
    header, data = read_safetensors(weights_dir / "weights.safetensors")

    def raw(name: str) -> bytes:
        a, b = header[name]["data_offsets"]
        return data[a:b]

    emb = header[EMBED]
    if emb["shape"][0] != len(kept) + 1 or emb["dtype"] != "BF16":
        raise MaterializeError(f"{EMBED}: expected {len(kept) + 1} BF16 rows, found {emb['shape']} {emb['dtype']}")
    hidden = emb["shape"][1]
    compact = np.frombuffer(raw(EMBED), np.uint16).reshape(len(kept) + 1, hidden)
    row_of = np.full(VOCAB, len(kept), np.int64)  # every token not kept: the shared row
    row_of[kept] = np.arange(len(kept))

    names = [EMBED] + sorted(n for n in header if n != EMBED)
    tensors = []
    for n in names:
        shape = tuple(header[n]["shape"]) if n != EMBED else (VOCAB, hidden)
        dtype = header[n]["dtype"]
        tensors.append((n, dtype, shape, int(np.prod(shape)) * _DTYPES[dtype][1]))
    for stale in out.glob("model.safetensors*"):
        stale.unlink()
    with open(out / "model.safetensors", "wb") as f:
        f.write(safetensors_header(tensors))
        for start in range(0, VOCAB, 1 << 15):  # the embedding, in blocks of rows
            f.write(compact[row_of[start:start + (1 << 15)]].tobytes())
        for n in names[1:]:
            f.write(raw(n))

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    if tokenizer:
        from qwen35.demo.real_vocab import write_chat_template, write_tokenizer_files

        write_tokenizer_files(out)
        write_chat_template(out)
    (out / "README.md").write_text(
        "---\nlicense: apache-2.0\n---\n"
        "qwen35-demo: a tiny Qwen3.5 (hybrid Gated DeltaNet + full attention, MTP head, vision tower) trained on "
        "a small synthetic world (capitals of 50 countries, three tools, pictures of coloured shapes). A toy: "
        "it knows nothing else.\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args(argv)
    out = materialize(args.out, args.weights)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
