"""Video for the one engine: frames sampled as Qwen3.5's video processor samples them, shown to the
model in pairs (the vision tower's temporal patch is two frames), each pair after its timestamp.

What transformers' Qwen3-VL processor (which Qwen3.5 uses) does, and what we do the same way:
- frames are taken at 2 per second: n = int(frames / video_fps × 2), at least 4, at most 768 and at
  most the video's frames, at the indices round(linspace(0, frames - 1, n));
- an odd count is padded by repeating the last frame; frames 2k and 2k+1 form one temporal patch;
- each pair is written `<t seconds>` (t: the mean of its two frames' times, one decimal) followed
  by its own <|vision_start|> … <|vision_end|>, in place of the template's
  `<|vision_start|><|video_pad|><|vision_end|>`; M-RoPE positions each pair like an image.
llama.cpp's mtmd (0.3.36) merges two adjacent frames marked mergeable into one image chunk, feeding
the frames to the two temporal halves of the patch embedding: the same pairing (mtmd.cpp
`mtmd_group_mergeable_bitmaps`; clip.cpp's qwen3vl graph). What differs: mtmd sizes each pair as an
image (aspect kept, padded, at most `image_max_tokens`), where transformers resizes all frames to
one shared pixel budget; and mtmd's own video path (ffmpeg inside llama.cpp, 4 frames a second,
`[0m5.00s]` stamps) is not Qwen's, so we sample the frames ourselves.

A video file needs `ffmpeg` and `ffprobe` on PATH; a directory of frame images (or a list of them)
needs neither: its frames are taken as already sampled at 2 per second.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.errors import ChatError

FPS = 2.0  # frames a second the Qwen3-VL video processor samples
MIN_FRAMES, MAX_FRAMES = 4, 768
TEMPORAL_PATCH = 2  # frames per temporal patch (vision_config.temporal_patch_size)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class Frames:
    """Sampled frames (encoded image files, or paths to them) and each pair's timestamp."""

    frames: list  # bytes or paths, TEMPORAL_PATCH per pair
    seconds: list[float]  # one per pair
    name: str


def sample_indices(total_frames: int, video_fps: float) -> list[int]:
    """The frames the Qwen3-VL video processor samples from a video of `total_frames` at `video_fps`."""
    n = int(total_frames / video_fps * FPS)
    n = min(max(n, MIN_FRAMES), MAX_FRAMES, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()


def pair_seconds(indices: list[int], video_fps: float) -> list[float]:
    """Each temporal patch's timestamp: the mean time of its frames (the last frame repeated to fill it)."""
    padded = list(indices) + [indices[-1]] * (-len(indices) % TEMPORAL_PATCH)
    times = [i / video_fps for i in padded]
    return [(times[i] + times[i + TEMPORAL_PATCH - 1]) / 2 for i in range(0, len(times), TEMPORAL_PATCH)]


def stamp(seconds: float) -> str:
    """How the processor writes a pair's time in the prompt."""
    return f"<{seconds:.1f} seconds>"


def pad_frames(frames: list) -> list:
    """Frames to a whole number of temporal patches, repeating the last (as the processor pads)."""
    return list(frames) + [frames[-1]] * (-len(frames) % TEMPORAL_PATCH)


def from_frames(frames: list, name: str) -> Frames:
    """Frames already sampled at FPS (paths or encoded bytes), in order."""
    if not frames:
        raise ChatError(f"{name} holds no frames")
    if len(frames) > MAX_FRAMES:
        raise ChatError(f"{name} has {len(frames)} frames; Qwen3.5 takes at most {MAX_FRAMES}")
    return Frames(pad_frames(frames), pair_seconds(list(range(len(frames))), FPS), name)


def read_video(source) -> Frames:
    """A video file (sampled with ffmpeg), a directory of frame images (sorted by name), or a list of
    frames (paths or bytes)."""
    if isinstance(source, (list, tuple)):
        return from_frames(list(source), "the video's frame list")
    path = Path(source)
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise ChatError(f"{path} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        return from_frames(frames, str(path))
    if not path.is_file():
        raise ChatError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    return _sample_with_ffmpeg(path)


def _sample_with_ffmpeg(path: Path) -> Frames:
    tools = {name: shutil.which(name) for name in ("ffmpeg", "ffprobe")}
    missing = [name for name, found in tools.items() if not found]
    if missing:
        raise ChatError(f"reading the video {path} needs {' and '.join(missing)} on PATH (install ffmpeg), "
                        "or give a directory of its frames sampled at 2 per second")
    probe = _run([tools["ffprobe"], "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
                  "stream=nb_read_frames,avg_frame_rate", "-of", "json", str(path)], path)
    try:
        stream = json.loads(probe)["streams"][0]
        total = int(stream["nb_read_frames"])
        num, _, den = stream["avg_frame_rate"].partition("/")
        video_fps = float(num) / float(den or 1)
    except (ValueError, KeyError, IndexError, ZeroDivisionError):
        raise ChatError(f"{path} is not a video ffprobe can read") from None
    if total < 1 or video_fps <= 0:
        raise ChatError(f"{path} has no video frames")
    indices = sample_indices(total, video_fps)
    with tempfile.TemporaryDirectory(prefix="qwen35-video-") as tmp:
        chosen = "+".join(f"eq(n\\,{i})" for i in sorted(set(indices)))
        _run([tools["ffmpeg"], "-v", "error", "-nostdin", "-i", str(path), "-vf", f"select='{chosen}'",
              "-fps_mode", "passthrough", str(Path(tmp) / "%06d.png")], path)
        written = sorted(Path(tmp).glob("*.png"))
        if len(written) != len(set(indices)):
            raise ChatError(f"ffmpeg gave {len(written)} of the {len(set(indices))} frames sampled from {path}")
        by_index = dict(zip(sorted(set(indices)), (p.read_bytes() for p in written)))
    return Frames(pad_frames([by_index[i] for i in indices]), pair_seconds(indices, video_fps), str(path))


def _run(argv: list[str], path: Path) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ChatError(f"cannot run {argv[0]}: {e.strerror}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise ChatError(f"{Path(argv[0]).name} could not read {path}: {last}")
    return done.stdout
