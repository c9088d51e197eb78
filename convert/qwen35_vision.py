"""The Qwen3.5 vision tower → an mmproj GGUF (llama.cpp's `clip` file, projector `qwen3vl_merger`).

Facts read from the reference converter's Qwen3VLVisionModel (the pinned sdist's
conversion/qwen3vl.py and base.py's MmprojModel, and from tools/mtmd/clip.cpp, which loads the file).
The tower is the same in every release that has one: a Conv3D patch embedding over pairs of frames,
learned position embeddings on a square grid (interpolated to the image's grid), ViT blocks with a
fused qkv, and a merger (LayerNorm, then two linears over 2×2 merged patches) into the text width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as T

from . import transforms as tf
from .checkpoint import Checkpoint, read_json
from .errors import ConvertError
from .plan import PlannedTensor, Source

VISION = "model.visual."
PROJECTOR = "qwen3vl_merger"
# --mmproj-type: what the matrices are written as, and general.file_type (llama.cpp's LlamaFileType).
MMPROJ_TYPES = {"f32": (T.F32, 0), "f16": (T.F16, 1), "bf16": (T.BF16, 32), "q8_0": (T.Q8_0, 7)}

# HF name (after `model.visual.blocks.N.`) → GGUF name (after `v.blk.N.`). qkv stays fused.
BLOCK_RENAMES = {
    "norm1.weight": "ln1.weight",
    "norm1.bias": "ln1.bias",
    "attn.qkv.weight": "attn_qkv.weight",
    "attn.qkv.bias": "attn_qkv.bias",
    "attn.proj.weight": "attn_out.weight",
    "attn.proj.bias": "attn_out.bias",
    "norm2.weight": "ln2.weight",
    "norm2.bias": "ln2.bias",
    "mlp.linear_fc1.weight": "ffn_up.weight",
    "mlp.linear_fc1.bias": "ffn_up.bias",
    "mlp.linear_fc2.weight": "ffn_down.weight",
    "mlp.linear_fc2.bias": "ffn_down.bias",
}
# HF name (after `model.visual.`) → GGUF name, outside the blocks.
GLOBAL_RENAMES = {
    "patch_embed.proj.bias": "v.patch_embd.bias",
    "pos_embed.weight": "v.position_embd.weight",
    "merger.norm.weight": "v.post_ln.weight",
    "merger.norm.bias": "v.post_ln.bias",
    "merger.linear_fc1.weight": "mm.0.weight",
    "merger.linear_fc1.bias": "mm.0.bias",
    "merger.linear_fc2.weight": "mm.2.weight",
    "merger.linear_fc2.bias": "mm.2.bias",
}
# The Conv3D patch embedding becomes one Conv2D weight per frame of a pair (transforms.temporal_slice_rows).
PATCH_EMBED = "patch_embed.proj.weight"
PATCH_EMBED_FRAMES = ("v.patch_embd.weight", "v.patch_embd.weight.1")


@dataclass(frozen=True)
class VisionHparams:
    depth: int
    hidden: int
    ffn_length: int
    n_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    n_positions: int
    out_hidden: int  # the merger's output width
    text_hidden: int  # what llama.cpp checks it against (clip.vision.projection_dim)
    eps: float  # the text model's rms_norm_eps: llama.cpp uses it for the tower's LayerNorms too

    @property
    def image_size(self) -> int:
        """The side, in pixels, of the position-embedding grid (√2304·16 = 768 in the releases)."""
        return int(self.n_positions ** 0.5 * self.patch_size)

    @property
    def merged_width(self) -> int:
        return self.hidden * self.spatial_merge_size ** 2


def has_vision_tower(config: dict, ckpt: Checkpoint) -> bool:
    return bool(config.get("vision_config")) and any(name.startswith(VISION) for name in ckpt.tensors)


def read_vision_hparams(config: dict) -> VisionHparams:
    """From the merged config (text keys over the root; `vision_config` stays nested)."""
    v = config["vision_config"]

    def need(key: str):
        if v.get(key) is None:
            raise ConvertError(f"config.json's vision_config lacks {key}, which a Qwen3.5 vision tower must have")
        return v[key]

    h = VisionHparams(
        depth=int(need("depth")), hidden=int(need("hidden_size")), ffn_length=int(need("intermediate_size")),
        n_heads=int(need("num_heads")), in_channels=int(v.get("in_channels", 3)), patch_size=int(need("patch_size")),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)), spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        n_positions=int(need("num_position_embeddings")), out_hidden=int(need("out_hidden_size")),
        text_hidden=int(config["hidden_size"]), eps=float(config.get("rms_norm_eps", 1e-6)),
    )
    if h.temporal_patch_size != 2:
        raise ConvertError(f"vision_config.temporal_patch_size is {h.temporal_patch_size}; llama.cpp's "
                           "Qwen3-VL encoder splits the patch embedding into exactly 2 frames")
    if h.spatial_merge_size != 2:
        raise ConvertError(f"vision_config.spatial_merge_size is {h.spatial_merge_size}; llama.cpp's "
                           "Qwen3-VL encoder merges 2×2 patches")
    if math.isqrt(h.n_positions) ** 2 != h.n_positions:
        raise ConvertError(f"vision_config.num_position_embeddings {h.n_positions} is not a square grid")
    if v.get("deepstack_visual_indexes"):
        raise ConvertError("vision_config.deepstack_visual_indexes is not empty: deepstack mergers are Qwen3-VL's, "
                           "not Qwen3.5's, and qwen35 does not write them")
    if h.out_hidden != h.text_hidden:
        raise ConvertError(f"the vision tower's output width (out_hidden_size {h.out_hidden}) differs from the "
                           f"text model's hidden_size {h.text_hidden}")
    return h


def expected_shapes(h: VisionHparams) -> dict[str, tuple[int, ...]]:
    """Checkpoint shape of every tower tensor (name after `model.visual.`, blocks as `blocks.N.`)."""
    W, M = h.hidden, h.merged_width
    shapes = {
        PATCH_EMBED: (W, h.in_channels, h.temporal_patch_size, h.patch_size, h.patch_size),
        "patch_embed.proj.bias": (W,),
        "pos_embed.weight": (h.n_positions, W),
        "merger.norm.weight": (W,), "merger.norm.bias": (W,),
        "merger.linear_fc1.weight": (M, M), "merger.linear_fc1.bias": (M,),
        "merger.linear_fc2.weight": (h.out_hidden, M), "merger.linear_fc2.bias": (h.out_hidden,),
    }
    block = {
        "norm1.weight": (W,), "norm1.bias": (W,), "norm2.weight": (W,), "norm2.bias": (W,),
        "attn.qkv.weight": (3 * W, W), "attn.qkv.bias": (3 * W,),
        "attn.proj.weight": (W, W), "attn.proj.bias": (W,),
        "mlp.linear_fc1.weight": (h.ffn_length, W), "mlp.linear_fc1.bias": (h.ffn_length,),
        "mlp.linear_fc2.weight": (W, h.ffn_length), "mlp.linear_fc2.bias": (W,),
    }
    for i in range(h.depth):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    return shapes


def plan_tensors(ckpt: Checkpoint, h: VisionHparams) -> list[PlannedTensor]:
    """The mmproj's tensors in file order; every `model.visual.*` tensor has a place or is an error."""
    shapes = expected_shapes(h)
    planned = []

    def source(suffix: str):
        name = VISION + suffix
        if name not in ckpt:
            raise ConvertError(f"checkpoint lacks tensor {name}")
        info = ckpt[name]
        if info.shape != shapes[suffix]:
            raise ConvertError(f"tensor {name} has shape {list(info.shape)} but config.json implies {list(shapes[suffix])}")
        return info

    patch = source(PATCH_EMBED)
    frame_shape = (patch.shape[0], patch.shape[1], *patch.shape[3:])
    for t, gguf_name in enumerate(PATCH_EMBED_FRAMES):
        runs = tuple(tf.runs(tf.temporal_slice_rows(patch.shape, t)))
        planned.append(PlannedTensor(gguf_name, frame_shape, patch.dtype, (Source(patch.name, runs),)))

    def add(suffix: str, gguf_name: str):
        info = source(suffix)
        planned.append(PlannedTensor(gguf_name, info.shape, info.dtype, (Source(info.name, ((0, info.rows),)),)))

    for suffix, gguf_name in GLOBAL_RENAMES.items():
        if not suffix.startswith("merger."):
            add(suffix, gguf_name)
    for i in range(h.depth):
        for suffix, gguf_name in BLOCK_RENAMES.items():
            add(f"blocks.{i}.{suffix}", f"v.blk.{i}.{gguf_name}")
    for suffix, gguf_name in GLOBAL_RENAMES.items():
        if suffix.startswith("merger."):
            add(suffix, gguf_name)

    unplaced = sorted(set(n for n in ckpt.tensors if n.startswith(VISION)) - {VISION + s for s in shapes})
    if unplaced:
        raise ConvertError(f"checkpoint tensor {unplaced[0]} has no place in a {PROJECTOR} mmproj "
                           f"({len(unplaced)} such tensors)")
    return planned


def choose_type(t: PlannedTensor, type_name: str) -> tuple[T, str]:
    """(type, reason) as the reference converter picks it for an mmproj (base.py's MmprojModel)."""
    wanted = MMPROJ_TYPES[type_name][0]
    if len(t.shape) <= 1:
        return T.F32, "1-D: F32, as llama.cpp's ops need"
    if t.name == "v.position_embd.weight":
        return T.F32, "position embeddings stay F32"
    if t.name in PATCH_EMBED_FRAMES:
        if wanted == T.F16:
            return T.F16, "patch embedding: F16 at f16"
        return T.F32, "patch embedding: F32 unless f16"
    if wanted == T.Q8_0 and t.row_length % 32:
        return T.F16, f"row length {t.row_length} is not a multiple of Q8_0's block of 32: F16"
    return wanted, f"--mmproj-type {type_name}"


def image_normalization(checkpoint_dir: Path) -> tuple[list[float], list[float]]:
    """image_mean and image_std (per channel) from preprocessor_config.json (or processor_config.json's
    image_processor), which llama.cpp needs to normalize pixels as the model was trained."""
    found = {}
    for file_name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        data = read_json(checkpoint_dir / file_name)
        found.update(data.get(section, {}) if section else data)
    if "image_mean" not in found or "image_std" not in found:
        raise ConvertError(f"{checkpoint_dir / 'preprocessor_config.json'} is missing or lacks image_mean/image_std, "
                           "which the mmproj needs (pass --no-mmproj to convert the text model alone)")
    mean, std = found["image_mean"], found["image_std"]
    for key, values in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(values, list) and len(values) >= 3 and all(isinstance(x, (int, float)) for x in values)):
            raise ConvertError(f"preprocessor_config.json's {key} must be a list of 3 numbers, got {values!r}")
    return [float(x) for x in mean], [float(x) for x in std]


def metadata(h: VisionHparams, type_name: str, mean: list[float], std: list[float]) -> list[tuple[str, str, object]]:
    """Every key clip.cpp reads for a qwen3vl_merger projector, types as it checks them."""
    return [
        ("general.architecture", "string", "clip"),
        ("general.file_type", "u32", MMPROJ_TYPES[type_name][1]),
        ("general.quantization_version", "u32", 2),
        ("clip.projector_type", "string", PROJECTOR),
        ("clip.has_vision_encoder", "bool", True),
        # Without it clip.cpp silently uses gelu_quick; the tower's act is gelu_pytorch_tanh.
        ("clip.use_gelu", "bool", True),
        ("clip.vision.projection_dim", "u32", h.text_hidden),
        ("clip.vision.image_size", "u32", h.image_size),
        ("clip.vision.patch_size", "u32", h.patch_size),
        ("clip.vision.embedding_length", "u32", h.hidden),
        ("clip.vision.feed_forward_length", "u32", h.ffn_length),
        ("clip.vision.block_count", "u32", h.depth),
        ("clip.vision.attention.head_count", "u32", h.n_heads),
        ("clip.vision.attention.layer_norm_epsilon", "f32", h.eps),
        ("clip.vision.image_mean", "f32[]", mean),
        ("clip.vision.image_std", "f32[]", std),
        ("clip.vision.spatial_merge_size", "u32", h.spatial_merge_size),
        ("clip.vision.is_deepstack_layers", "bool[]", [False] * h.depth),
    ]


def size_label(tensors: list[PlannedTensor]) -> str:
    n = sum(t.n_elements for t in tensors)
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{round(n / 1e6)}M"
