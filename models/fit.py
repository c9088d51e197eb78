"""Which profile of a model fits this machine, decided from its config.json before anything is converted.

A release's GGUF is known from its config alone: the converter's plan (convert/qwen35.py) over the
safetensors headers the release has (demo/synthetic.py's checkpoint_layout, the same layout the plan
snapshots and the board guide in docs/boards.md are computed from), re-typed by each profile
(memory.as_profile). The runtime's own memory estimate (runtime/engine/memory.py) then says what a
chat at the asked context needs, counted as the decoder will count it when it loads the file — the
read-back snapshots dropped if that is what makes it fit, the vision tower and its largest image
included when the model has one — so the profile chosen here is never one the load refuses.

Best quality first (bf16 → q8_0 → q6_k → q5_k_m → q4_k_m → …). The first that fits with some memory
to spare (HEADROOM: the rest of the machine keeps working) is taken; failing that the first that fits
at all, said so; failing that, nothing, and what would help.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gguf.constants import GGMLQuantizationType

from ..convert import qwen35, qwen35_vision
from ..convert.checkpoint import TensorInfo as CheckpointTensor
from ..convert.errors import ConvertError
from ..convert.profiles import Choice
from ..demo.synthetic import checkpoint_layout
from ..gguf_header import TensorInfo
from ..runtime.engine import memory
from ..runtime.engine.decoder import N_BATCH, N_CHECKPOINTS
from ..runtime.engine.modelfile import ModelFile
from ..runtime.engine.repack import AMX_IN_USE
from ..runtime.engine.state_cache import READ_BACK
from ..runtime.engine.vision import DEFAULT_IMAGE_MAX_TOKENS
from .errors import ModelError

GIB = memory.GIB
# Highest quality first. On ARM, edge-arm (Q4_0 that llama.cpp repacks, output at Q8_0) comes before
# the 3- and 2-bit K-quants: on a board it is the fast 4-bit type.
QUALITY_ORDER = ("bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
ARM_ORDER = ("bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "edge-arm", "q3_k_m", "q2_k")
MMPROJ_TYPE = "f16"  # what `qwen35 convert` and `qwen35 pull` write the vision tower as
# Memory left free for everything else on the machine: an eighth of what is available, at least 256 MiB.
HEADROOM_FRACTION = 8
MIN_HEADROOM = 256 * memory.MIB


def is_arm(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("aarch64", "arm64", "armv8l", "armv7l")


def profile_order(arm: bool | None = None) -> tuple[str, ...]:
    return ARM_ORDER if (is_arm() if arm is None else arm) else QUALITY_ORDER


class HeaderOnlyCheckpoint:
    """The safetensors headers a release has (names, dtypes, shapes; no data), from its config alone."""

    def __init__(self, config: dict):
        self.tensors = {name: CheckpointTensor(name, dtype, shape, Path("/nonexistent"), 0, 0)
                        for name, dtype, shape in checkpoint_layout(config, experts="fused", mtp_experts="per_expert")}

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name):
        return self.tensors[name]


def release_model(config: dict, name: str = "model") -> ModelFile:
    """A release's GGUF header as `qwen35 convert` writes it, every tensor BF16 (memory.as_profile
    re-types it). `config`: config.json as the release ships it (text_config nested)."""
    h = qwen35.read_hparams({**config, **config.get("text_config", {})})
    tensors = qwen35.plan_tensors(HeaderOnlyCheckpoint(config), h, mtp=True)
    metadata = {key: value for key, _, value in qwen35.metadata(h, tensors)}
    infos = [TensorInfo(t.name, t.shape, GGMLQuantizationType.BF16, 0) for t in tensors]
    return ModelFile(Path(name), 0, metadata, infos, h.vocab_size)


def release_mmproj(config: dict, name: str = "mmproj") -> ModelFile | None:
    """The vision tower's GGUF header as `qwen35 convert` writes it (f16), or None without a tower."""
    ckpt = HeaderOnlyCheckpoint(config)
    merged = {**config, **config.get("text_config", {})}
    if not qwen35_vision.has_vision_tower(merged, ckpt):
        return None
    h = qwen35_vision.read_vision_hparams(merged)
    tensors = qwen35_vision.plan_tensors(ckpt, h)
    # Normalization constants do not change a size: any three numbers will do.
    metadata = {key: value for key, _, value in qwen35_vision.metadata(h, MMPROJ_TYPE, [0.5] * 3, [0.5] * 3)}
    infos = [TensorInfo(t.name, t.shape, Choice(*qwen35_vision.choose_type(t, MMPROJ_TYPE)).type, 0) for t in tensors]
    return ModelFile(Path(name), 0, metadata, infos, 0)


@dataclass(frozen=True)
class Machine:
    """What the estimate needs to know of the machine the model will run on."""

    available: int  # bytes of RAM available now (MemAvailable)
    features: frozenset[str]  # llama.cpp's CPU features (repacking)
    threads: int
    arm: bool
    # Whether weights of these ggml types get AMX here (which holds a copy of the weights it takes).
    amx_takes: Callable[[list[int]], bool] = lambda types: False

    @classmethod
    def this(cls, available: int | None = None) -> "Machine":
        from ..runtime.engine.cpu import amx_would_run
        from ..runtime.engine.repack import cpu_features
        from ..system import available_ram, performance_cores

        return cls(available_ram() if available is None else available, cpu_features(), performance_cores(), is_arm(),
                   amx_would_run)

    @property
    def headroom(self) -> int:
        return max(self.available // HEADROOM_FRACTION, MIN_HEADROOM)


def needed(mf: ModelFile, mmproj: ModelFile | None, n_ctx: int, machine: Machine, cache_ram: int | None = None) -> int:
    """Bytes the decoder will need to load `mf` for a chat at `n_ctx` (no drafting, the vision tower
    at the default image budget, `cache_ram` bytes of checkpoints: `serve --cache-ram`, or run's
    default), with the read-back snapshots where they fit and without them where only that fits, as
    the decoder decides."""
    recurrent = max(memory.recurrent_state_bytes(mf), 1)
    cache_bytes = cache_ram if cache_ram is not None else N_CHECKPOINTS * recurrent + (1 << 20)
    features = machine.features | ({AMX_IN_USE} if machine.amx_takes([t.ggml_type for t in mf.tensors]) else set())
    sizes = dict(n_batch=N_BATCH, n_checkpoints=-(-cache_bytes // recurrent),
                 threads=machine.threads, features=features, process=0, mmproj=mmproj,
                 image_max_tokens=DEFAULT_IMAGE_MAX_TOKENS if mmproj is not None else 0)
    full = memory.estimate(mf, n_ctx, **sizes, read_back=READ_BACK).needed
    if full <= machine.available:
        return full
    return memory.estimate(mf, n_ctx, **sizes, read_back=0).needed


@dataclass(frozen=True)
class Fit:
    profile: str | None  # None: nothing fits
    need: int  # bytes the chosen profile needs (or the smallest one's, when nothing fits)
    file_size: int  # bytes of its GGUF (without the mmproj)
    reason: str  # one line, for the user


def context_label(n_ctx: int) -> str:
    return f"{n_ctx // 1024}k" if n_ctx % 1024 == 0 else str(n_ctx)


def choose_profile(config: dict, label: str, n_ctx: int, machine: Machine, cache_ram: int | None = None) -> Fit:
    """The best-quality profile of this release that fits `machine` at `n_ctx` (and `cache_ram`, as
    `needed` takes it), and why, in a line."""
    try:
        base = release_model(config, label)
        mmproj = release_mmproj(config)
    except ConvertError as e:
        raise ModelError(f"{label}: {e}") from None

    def candidates():
        for name in profile_order(machine.arm):
            mf = base if name == "bf16" else memory.as_profile(base, name)
            yield name, needed(mf, mmproj, n_ctx, machine, cache_ram), sum(t.nbytes for t in mf.tensors)

    return decide(candidates(), label, n_ctx, machine)


def choose_gguf(files: dict[str, int], header, mmproj: ModelFile | None, label: str, n_ctx: int, machine: Machine,
                cache_ram: int | None = None) -> Fit:
    """The best of a GGUF repo's types ({type: bytes of its files}) that fits, and why: largest first
    (quality follows bits), each judged by the runtime's estimate on its header — `header(type)`, a
    ModelFile fetched only when that type is considered. A type whose files alone exceed the memory
    is passed over without fetching."""
    def candidates():
        for name, size in sorted(files.items(), key=lambda item: -item[1]):
            need = needed(header(name), mmproj, n_ctx, machine, cache_ram) if size <= machine.available else size
            yield name, need, size

    return decide(candidates(), label, n_ctx, machine)


def decide(candidates, label: str, n_ctx: int, machine: Machine) -> Fit:
    """From (name, bytes needed, file bytes) best first — evaluated lazily, up to the first that fits
    with HEADROOM to spare — the choice and its reason: which better one did not fit, and why."""
    ctx = context_label(n_ctx)
    seen = []
    for name, need, size in candidates:
        seen.append((name, need, size))
        if need + machine.headroom > machine.available:
            continue
        if len(seen) == 1:
            why = (f"{label}: {name} ({_gib(need)} at {ctx} context) leaves {_gib(machine.available - need)} of "
                   f"{_gib(machine.available)} free; taking it")
        else:
            tighter, tighter_need, _ = seen[-2]  # the next better one: why not that
            left = machine.available - tighter_need
            leaves = f"would leave {_gib(left)} free" if left >= 0 else f"would need {_gib(-left)} more than is free"
            why = f"{label}: {tighter} ({_gib(tighter_need)}) {leaves} at {ctx} context; taking {name}, {_gib(need)}"
        return Fit(name, need, size, why)
    fitting = [c for c in seen if c[1] <= machine.available]
    if fitting:
        name, need, size = fitting[0]
        return Fit(name, need, size, f"{label}: only {name} fits at {ctx} context ({_gib(need)} of "
                                     f"{_gib(machine.available)} available), leaving little for anything else")
    if not seen:
        raise ModelError(f"{label}: nothing to choose from")
    name, need, size = seen[-1]
    return Fit(None, need, size, f"{label} does not fit this machine at {ctx} context: even {name} needs "
                                 f"{_gib(need)} and {_gib(machine.available)} is available; try a shorter context "
                                 "(-c) or a smaller model")


def _gib(n: int) -> str:
    """GiB to a tenth; below a tenth, MiB ("would need 0.0 GiB more" said nothing)."""
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB // 10 else f"{n / memory.MIB:.0f} MiB"
