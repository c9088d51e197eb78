"""Tiny vision-language Qwen3.5 checkpoints in the release layout (dense, `SPEC`, and MoE,
`MOE_SPEC`: Qwen3_5MoeForConditionalGeneration with fused experts, as the BF16 releases store them),
with transformers' float32 references for one image: its embeddings (the vision tower's output) and
the logits of a prompt holding it.

Built like tests/fixtures.py's checkpoints (same text model, same release layout, reusing its
builders), plus a vision tower small enough to build in seconds but with every feature the real one
has: 2 blocks, 2×2 spatial merge, temporal patch 2, and a 4×4 position-embedding grid, which a
128×96 image (8×6 patches) makes transformers and llama.cpp interpolate. 128×96 is a multiple of
32 (patch × merge) in both directions with 12 ≥ 8 image tokens, so llama.cpp does not resize it.

transformers' own image processor needs PIL, which the test environment lacks, so the pixels are
patchified here exactly as Qwen2-VL's processor lays them out (the layout Qwen3.5's Conv3D reads).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np

from qwen35.demo import real_vocab
from tests import fixtures as F

SPEC = F.FixtureSpec("dense_vision", moe=False, tied=False, mtp=False, linear_key_heads=2, linear_value_heads=4)
MOE_SPEC = F.FixtureSpec("moe_vision", moe=True, tied=False, mtp=False, linear_key_heads=2, linear_value_heads=4,
                         fused_experts=True)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
IMAGE_WIDTH, IMAGE_HEIGHT = 128, 96
PATCH, MERGE, TEMPORAL = 16, 2, 2
N_IMAGE_TOKENS = (IMAGE_WIDTH // (PATCH * MERGE)) * (IMAGE_HEIGHT // (PATCH * MERGE))  # 4 × 3
TEXT_BEFORE, TEXT_AFTER = 10, 10
MEAN = STD = [0.5, 0.5, 0.5]
VISION_CONFIG = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                 "num_position_embeddings": 16, "patch_size": PATCH, "spatial_merge_size": MERGE,
                 "temporal_patch_size": TEMPORAL}


class VisionFixture:
    def __init__(self, root: Path, spec: F.FixtureSpec) -> None:
        self.root = root
        self.spec = spec
        self.checkpoint = root / "checkpoint"
        self.image = root / "image.png"
        self.prompt = json.loads((root / "prompt.json").read_text())  # before / after token ids, special ids

    @property
    def reference_embeddings(self) -> np.ndarray:
        """[N_IMAGE_TOKENS, hidden] float32: the vision tower's output (merger) for the image."""
        return np.load(self.root / "image_embeddings.npy")

    @property
    def reference_logits(self) -> np.ndarray:
        """[len(prompt ids), vocab] float32 logits of before + <|vision_start|> + image + <|vision_end|> + after."""
        return np.load(self.root / "reference_logits.npy")


def cached_vision_fixture(cache_root: Path, spec: F.FixtureSpec = SPEC) -> VisionFixture:
    root = Path(cache_root) / f"{spec.name}-{F._builder_key(__name__)}"
    F.build_once(root, lambda where: _build(where, spec))
    return VisionFixture(root, spec)


def _token_ids() -> dict[str, int]:
    n_bpe = len(F._bpe_vocab_and_merges()[0])
    return {t: n_bpe + i for i, t in enumerate(F._ADDED_TOKENS + VISION_TOKENS)}


def _write_tokenizer(checkpoint: Path) -> int:
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    vocab, merges = F._bpe_vocab_and_merges()
    added = [real_vocab.added_token(i, t) for t, i in _token_ids().items()]
    F._write_json(checkpoint / "tokenizer.json", real_vocab.tokenizer_json(vocab, merges, added, PRETOKENIZE_REGEX))
    F._write_json(checkpoint / "tokenizer_config.json", real_vocab.tokenizer_config(added))
    return len(vocab)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG, no filtering (enough for stb_image, which llama.cpp decodes with)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def patchify(rgb: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(pixel_values [patches, C·T·P·P], grid_thw [t, h, w]) as Qwen2-VL's image processor makes them:
    rescaled to [0, 1], normalized per channel, the still frame repeated TEMPORAL times, patches
    ordered by 2×2 merge windows in row-major order."""
    x = (rgb.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    x = np.tile(x.transpose(2, 0, 1)[None], (TEMPORAL, 1, 1, 1))  # [T, C, H, W]
    gh, gw = rgb.shape[0] // PATCH, rgb.shape[1] // PATCH
    x = x.reshape(1, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * TEMPORAL * PATCH * PATCH), [1, gh, gw]


def _vision_value(name: str, shape: tuple[int, ...], generator):
    """Random tower weights at a scale where every block shapes the output (the init's 0.02 would not)."""
    import torch

    def normal(std):
        return torch.randn(shape, generator=generator) * std

    if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
        return 1.0 + normal(0.2)  # LayerNorm: a plain weight
    if name.endswith(".bias"):
        return normal(0.1)
    if name.endswith("pos_embed.weight"):
        return normal(0.5)
    return normal(1.0 / math.sqrt(int(np.prod(shape[1:]))))  # fan-in (the Conv3D's is C·T·P·P)


def _build(root: Path, spec: F.FixtureSpec) -> None:
    import torch

    checkpoint = root / "checkpoint"
    saved = root / "saved_by_transformers"
    checkpoint.mkdir(parents=True)
    seed = 20260
    ids = _token_ids()
    config = F._release_config(spec)
    config["vision_config"].update(VISION_CONFIG)
    config.update(image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    F._write_json(checkpoint / "config.json", config)
    F._write_json(checkpoint / "generation_config.json", F._generation_config())
    F._write_json(checkpoint / "preprocessor_config.json",
                  {"image_mean": MEAN, "image_std": STD, "patch_size": PATCH, "temporal_patch_size": TEMPORAL,
                   "merge_size": MERGE})
    n_bpe = _write_tokenizer(checkpoint)
    F._write_chat_template(checkpoint)

    model_class = F._model_class(spec)
    torch.manual_seed(seed)
    model = model_class(model_class.config_class.from_pretrained(checkpoint)).float()
    generator = torch.Generator().manual_seed(seed)
    F._randomize(model, generator, F._residual_scale(spec))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".visual." in f".{name}":
                parameter.copy_(_vision_value(name, tuple(parameter.shape), generator))
    model.save_pretrained(saved)
    tensors = F._release_tensors(spec, F._read_saved(saved), torch.Generator().manual_seed(seed + 1))
    F._write_safetensors(checkpoint, tensors, 1)
    shutil.rmtree(saved)

    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
    write_png(root / "image.png", rgb)
    before = rng.integers(0, n_bpe, TEXT_BEFORE).tolist()
    after = rng.integers(0, n_bpe, TEXT_AFTER).tolist()
    prompt = {"before": before, "after": after, **{k.strip("<|>"): v for k, v in ids.items() if k in VISION_TOKENS}}
    (root / "prompt.json").write_text(json.dumps(prompt))

    pixel_values, grid = patchify(rgb)
    input_ids = (before + [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * N_IMAGE_TOKENS
                 + [ids["<|vision_end|>"]] + after)
    loaded, info = model_class.from_pretrained(checkpoint, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise AssertionError(f"checkpoint does not load cleanly: {info}")
    loaded.eval()
    with torch.no_grad():
        pv, thw = torch.from_numpy(pixel_values), torch.tensor([grid])
        embeddings = loaded.model.get_image_features(pixel_values=pv, image_grid_thw=thw).pooler_output[0]
        # 1 marks image tokens, as the processor marks them: M-RoPE positions are computed from it.
        mm_types = torch.tensor([[int(i == ids["<|image_pad|>"]) for i in input_ids]])
        logits = loaded(input_ids=torch.tensor([input_ids]), pixel_values=pv, image_grid_thw=thw,
                        mm_token_type_ids=mm_types).logits[0]
    np.save(root / "image_embeddings.npy", embeddings.to(torch.float32).numpy())
    np.save(root / "reference_logits.npy", logits.to(torch.float32).numpy())
