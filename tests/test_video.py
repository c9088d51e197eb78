"""Video: frames sampled and stamped as transformers' Qwen3-VL processor samples and stamps them, a
pair of frames encoded by mtmd as one temporal patch exactly as transformers' tower encodes it, the
prompt laid out as `<t seconds><|vision_start|>…<|vision_end|>` per pair, and ffmpeg's absence one
line. Frames are hand-made PNGs (tests/vision_fixture.write_png); the ffmpeg path runs against a
stand-in ffmpeg/ffprobe on PATH (this machine has none), which records what it was asked."""

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen35.runtime import ChatError
from qwen35.runtime.conversation import video as V
from tests.test_runtime_cli import run_cli
from tests.vision_fixture import IMAGE_HEIGHT, IMAGE_WIDTH, MEAN, MERGE, N_IMAGE_TOKENS, PATCH, STD, TEMPORAL, write_png


# --- sampling and timestamps, against transformers --------------------------------------------------


def test_sampling_and_timestamps_by_hand():
    # 3 s at 10 frames/s: int(30 / 10 * 2) = 6 frames at round(linspace(0, 29, 6)).
    assert V.sample_indices(30, 10.0) == [0, 6, 12, 17, 23, 29]
    assert V.pair_seconds([0, 6, 12, 17, 23, 29], 10.0) == pytest.approx([0.3, 1.45, 2.6])
    assert [V.stamp(t) for t in (0.25, 1.0, 12.34)] == ["<0.2 seconds>", "<1.0 seconds>", "<12.3 seconds>"]
    assert V.sample_indices(3, 30.0) == [0, 1, 2]  # at least 4 frames, but never more than the video has
    assert V.sample_indices(100, 25.0) == [0, 14, 28, 42, 57, 71, 85, 99]  # 4 s: 8 frames
    assert V.pad_frames(["a", "b", "c"]) == ["a", "b", "c", "c"]
    # Odd counts: the last frame is repeated to fill the pair, and the pair's time is its own.
    assert V.pair_seconds([0, 1, 2], 2.0) == [0.25, 1.0]


def _transformers_sample_frames():
    """Qwen3VLVideoProcessor.sample_frames with the processor's own defaults (2 fps, 4..768 frames)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    processor = Qwen3VLVideoProcessor()
    return lambda total, fps: processor.sample_frames(VideoMetadata(total_num_frames=total, fps=fps)).tolist()


def test_sampling_and_timestamps_match_transformers():
    pytest.importorskip("torch")
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    sample_frames = _transformers_sample_frames()
    for total, fps in [(30, 10.0), (3, 30.0), (100, 25.0), (241, 29.97), (9000, 30.0), (7, 1.0), (50, 24.0)]:
        theirs = sample_frames(total, fps)
        assert V.sample_indices(total, fps) == theirs, (total, fps)
        assert V.pair_seconds(theirs, fps) == pytest.approx(Qwen3VLProcessor._calculate_timestamps(None, theirs, fps, 2))


# --- a frame pair is one temporal patch, as transformers encodes it ----------------------------------


def _frames(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8) for _ in range(n)]


def _write_frames(directory, frames) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rgb in enumerate(frames):
        paths.append(directory / f"frame{i:03d}.png")
        write_png(paths[-1], rgb)
    return paths


def _patchify_pair(a: np.ndarray, b: np.ndarray):
    """Two frames laid out as Qwen3-VL's video processor lays out one temporal patch."""
    x = np.stack([a, b]).astype(np.float32) / 255.0
    x = ((x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(0, 3, 1, 2)  # [T, C, H, W]
    gh, gw = IMAGE_HEIGHT // PATCH, IMAGE_WIDTH // PATCH
    x = x.reshape(1, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * TEMPORAL * PATCH * PATCH), [1, gh, gw]


def test_a_frame_pair_is_encoded_as_transformers_encodes_a_temporal_patch(vision_fixture, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    from qwen35.convert.pipeline import Conversion
    from tests.fixtures import _model_class
    from tests.test_vision_parity import MIN_COSINE, Run

    text, mmproj = Conversion(vision_fixture.checkpoint, ["f32"], tmp_path / "", mmproj="f32").run()
    a, b = _frames(2)
    paths = _write_frames(tmp_path / "frames", [a, b])
    run = Run(text.path, mmproj.path)
    try:
        images = [run.projector.image(p, mergeable=True) for p in paths]
        chunks = run.projector.tokenize(run.projector.marker * 2, images)
        for image in images:
            image.close()
        kinds = [c.is_image for c in chunks.items]
        assert kinds == [False, True, False]  # one image chunk for the two frames
        (pair,) = [c for c in chunks.items if c.is_image]
        assert (pair.n_tokens, pair.n_pos) == (N_IMAGE_TOKENS, 4)
        ours = run.projector.encode(pair)
        chunks.close()
    finally:
        run.close()

    model = _model_class(vision_fixture.spec).from_pretrained(vision_fixture.checkpoint, dtype=torch.float32).eval()
    pixels, grid = _patchify_pair(a, b)
    with torch.no_grad():
        theirs = model.model.get_video_features(torch.from_numpy(pixels), torch.tensor([grid])).pooler_output[0].numpy()
        still = model.model.get_video_features(torch.from_numpy(_patchify_pair(a, a)[0]),
                                               torch.tensor([grid])).pooler_output[0].numpy()
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cosine.min() >= MIN_COSINE, cosine
    # The second frame matters: a pair of two different frames is not the first frame held still.
    assert np.abs(theirs - still).max() > 10 * np.abs(ours - theirs).max()


# --- the prompt, the session, the command line --------------------------------------------------------


@pytest.fixture(scope="module")
def model(vision_fixture, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from qwen35.convert.pipeline import Conversion

    out = tmp_path_factory.mktemp("video-chat")
    text, _ = Conversion(vision_fixture.checkpoint, ["f32"], out / "", mmproj="f16").run()
    return text.path


def test_the_prompt_has_each_pair_after_its_timestamp(model, tmp_path):
    from qwen35.runtime import ChatSession
    from qwen35.runtime.engine.state_cache import position

    frames = _write_frames(tmp_path / "clip", _frames(3))  # 3 frames: the last is repeated to make 2 pairs
    with ChatSession(model, n_ctx=1024, threads=2, seed=0) as chat:
        part = chat.add_video(tmp_path / "clip")
        assert part["seconds"] == [0.25, 1.0] and len(part["frames"]) == 4 and part["frames"][3] == part["frames"][2]
        chat.send("What happens?", video=tmp_path / "clip", temp=0, max_tokens=2)
        assert chat.stats["image_tokens"] == 2 * N_IMAGE_TOKENS  # two pairs, each one merged image
        held = chat.context_tokens()
        start, end = chat.tokenize("<|vision_start|>"), chat.tokenize("<|vision_end|>")
        pair = list(chat.media._image_cells["+".join(part["frames"][:2])].cells)
        second = list(chat.media._image_cells["+".join(part["frames"][2:])].cells)
        layout = chat.tokenize("<0.2 seconds>") + pair + chat.tokenize("<1.0 seconds>") + second
        i = next(i for i in range(len(held)) if held[i:i + len(layout)] == layout)
        assert held[i - 1] != start[0] and held[i + len(layout)] != end[0]  # the template's own marks are replaced
        assert pair[0] == start[0] and pair[-1] == end[0]
        # M-RoPE: each pair advances max(4, 3) positions.
        assert position(held) == len(held) - 2 * (N_IMAGE_TOKENS - 4)
        assert chat.image_tokens(part) == len(layout)
        # The next turn reuses both pairs.
        chat.send("And then?", temp=0, max_tokens=2)
        assert chat.stats["image_tokens"] == 0


def test_a_list_of_frames_and_bad_frames(model, tmp_path):
    from qwen35.runtime import ChatSession

    frames = _write_frames(tmp_path / "clip", _frames(2))
    small = tmp_path / "small.png"
    write_png(small, _frames(1)[0][:64, :64])
    with ChatSession(model, n_ctx=1024, threads=2, seed=0) as chat:
        part = chat.add_video([p.read_bytes() for p in frames])
        assert part["seconds"] == [0.25] and "paths" not in part
        with pytest.raises(ChatError, match="frames of a video must all be of one size"):
            chat.add_video([frames[0], small])
        with pytest.raises(ChatError, match="holds no frame images"):
            (tmp_path / "empty").mkdir()
            chat.add_video(tmp_path / "empty")
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
        with pytest.raises(ChatError, match="is not an image llama.cpp can decode"):
            chat.add_video(tmp_path / "bad")
        assert chat.messages == []


def test_a_video_file_without_ffmpeg_is_one_line(model, tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 64)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(ChatError, match="needs ffmpeg and ffprobe on PATH"):
        V.read_video(clip)
    result = run_cli("run", str(model), "--video", str(clip), "-p", "what happens?")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: reading the video") and "ffmpeg" in result.stderr


def _fake_tools(bin_dir, frame_png, total: int, rate: str) -> None:
    """ffprobe that reports `total` frames at `rate`; ffmpeg that writes one PNG per selected frame
    and records the selection."""
    bin_dir.mkdir()
    probe = {"streams": [{"nb_read_frames": str(total), "avg_frame_rate": rate}]}
    scripts = {
        "ffprobe": f"import json; print(json.dumps({probe!r}))",
        "ffmpeg": ("import re, shutil, sys\n"
                   "args = sys.argv[1:]; select = args[args.index('-vf') + 1]\n"
                   f"open({str(bin_dir / 'selected')!r}, 'w').write(select)\n"
                   "for k, _ in enumerate(re.findall(r'eq\\(n\\\\,(\\d+)\\)', select), 1):\n"
                   f"    shutil.copy({str(frame_png)!r}, args[-1] % k)\n"),
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_a_video_file_is_sampled_with_ffmpeg(model, tmp_path, monkeypatch):
    frame = _write_frames(tmp_path / "f", _frames(1))[0]
    _fake_tools(tmp_path / "bin", frame, total=30, rate="10/1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 64)
    sampled = V.read_video(clip)
    assert (tmp_path / "bin" / "selected").read_text() == "select='" + "+".join(
        f"eq(n\\,{i})" for i in [0, 6, 12, 17, 23, 29]) + "'"
    assert len(sampled.frames) == 6 and sampled.seconds == pytest.approx([0.3, 1.45, 2.6])
    result = run_cli("run", str(model), "--video", str(clip), "-p", "what happens?", "--json", "--max-tokens", "2",
                     "--temp", "0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["image_tokens"] == 3 * N_IMAGE_TOKENS


def test_repl_video_command(model, tmp_path):
    from qwen35.runtime import ChatSession
    from qwen35.runtime.frontends.repl import Repl
    import io

    _write_frames(tmp_path / "clip", _frames(2))
    out = io.StringIO()
    with ChatSession(model, n_ctx=1024, threads=2, seed=0, prefill=False, temp=0, max_tokens=2) as chat:
        repl = Repl(chat, hide_thinking=True, out=out)
        repl._command(f"/video {tmp_path / 'clip'}")
        assert "1 frame pairs" in out.getvalue() and repl.video == str(tmp_path / "clip")
        repl._reply("what happens?")
        assert chat.stats["image_tokens"] == N_IMAGE_TOKENS and repl.video is None
        assert chat.messages[0]["content"][0]["type"] == "video"
