"""Images and video in a conversation: the encoded files it shows, and the context cells they take.

A message shows an image as a content part naming the image's SHA-256 ({"type": "image", "image":
…}); the bytes are held here, once, whatever the number of messages or requests that show them. In
the context an image is a run of stand-in cells (state_cache.image_cells): <|vision_start|>, one
cell a token of the image, <|vision_end|>. A video is, per pair of frames, its timestamp and the
pair as one image of two temporal halves (video.py). The cells of an image are known before it is
encoded (mtmd tokenizes it), so a prompt's length and its checkpoints are known before any work;
encoding happens when the decode reaches the image's first cell (`evaluate`).

The vision tower (the mmproj) loads at the first image: a text-only chat never pays for it.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine import native
from ..engine.errors import ChatError
from ..engine.state_cache import StateCache, image_cells, position
from ..engine.vision import Chunks, Projector, read_image
from .video import read_video, stamp

IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"  # the template's image; mtmd writes the start and end itself
VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"  # the template's video: replaced by its stamped frame pairs
_MEDIA_SLOT = re.compile(re.escape(IMAGE_SLOT) + "|" + re.escape(VIDEO_SLOT))


@dataclass(frozen=True)
class ImageCells:
    """How one image sits in the context: <|vision_start|>, its stand-ins, <|vision_end|>."""

    cells: tuple[int, ...]
    n_tokens: int  # the image's own cells
    n_pos: int  # positions it advances


class Media:
    """The images (and video frames) of one session's conversations, and their cells.

    `mmproj`: the vision tower's file (None: images are refused, naming `expected`, where
    `qwen35 convert` would have written it)."""

    def __init__(self, model: native.Model, model_name: str, n_ctx: int, threads: int, mmproj: Path | None,
                 expected: Path | None, image_max_tokens: int | None) -> None:
        self._model, self._model_name = model, model_name
        self.n_ctx = n_ctx
        self.threads = threads  # for the projector, when it loads
        self._mmproj, self._mmproj_expected = mmproj, expected
        self._image_max_tokens = image_max_tokens
        self._projector: Projector | None = None
        self.images: dict[str, bytes] = {}  # SHA-256 → encoded file: what the conversation's image parts name
        # Keyed by an image's SHA-256, or a video's frame pair as "<SHA-256>+<SHA-256>" (one image to mtmd).
        self._image_cells: dict[str, ImageCells] = {}
        self._image_at: dict[int, str] = {}  # first stand-in → image, for evaluating a run of cells
        self._tokenized: dict[str, Chunks] = {}  # images tokenized for the turn under way (freed after it)
        self.work = [0, 0.0]  # image tokens evaluated and seconds taken, this turn

    @property
    def has_vision(self) -> bool:
        return self._mmproj is not None

    def vision(self) -> Projector:
        """The model's mmproj, loaded on first use."""
        if self._projector is None:
            if self._mmproj is None:
                raise ChatError(f"{self._model_name} has no vision tower beside it: images need "
                                f"{self._mmproj_expected} (written by `qwen35 convert`), or give its mmproj with "
                                "--mmproj FILE")
            self._projector = Projector(self._mmproj, self._model, native.L.llama_model_n_embd(self._model.ptr),
                                        threads=self.threads, image_max_tokens=self._image_max_tokens)
        return self._projector

    # --- what the conversation shows ------------------------------------------------------------

    def add_image(self, source) -> dict:
        """Check an image (a path or encoded bytes: it must decode, and fit the context) and hold it;
        returns the content part that shows it in a message."""
        data, name = read_image(source)
        image_id = hashlib.sha256(data).hexdigest()
        part = {"type": "image", "image": image_id}
        if not isinstance(source, (bytes, bytearray)):
            part["path"] = str(Path(source).resolve())
        new = image_id not in self.images
        self.images[image_id] = data
        try:
            self.cells_of_image(part, name)
        except ChatError:
            if new:
                del self.images[image_id]
            raise
        return part

    def add_video(self, source) -> dict:
        """Check a video (see ChatSession.add_video) and hold its frames; returns its content part."""
        sampled = read_video(source)
        frames = [read_image(frame)[0] for frame in sampled.frames]
        ids = [hashlib.sha256(data).hexdigest() for data in frames]
        part = {"type": "video", "video": hashlib.sha256("+".join(ids).encode()).hexdigest(), "frames": ids,
                "seconds": sampled.seconds}
        if all(isinstance(f, (str, Path)) for f in sampled.frames):
            part["paths"] = [str(Path(f).resolve()) for f in sampled.frames]
        new = [i for i in dict.fromkeys(ids) if i not in self.images]
        self.images.update(zip(ids, frames))
        try:
            self.cells_of_video(part, sampled.name)
        except ChatError:
            for image_id in new:
                del self.images[image_id]
            raise
        return part

    def tokens_of(self, part: dict) -> int:
        """The context cells an image or video part takes, start and end marks (and a video's
        timestamps) included."""
        if part.get("type") == "video":
            return len(self.cells_of_video(part))
        return len(self.cells_of_image(part).cells)

    def hold(self, conversations: list[dict], images) -> None:
        """Keep `images` (encoded files) and forget those no message of `conversations` shows: a
        server sees a stream of images and must not keep them all (each request re-sends its own)."""
        given = {hashlib.sha256(data).hexdigest(): bytes(data) for data in images}
        shown = set()
        for m in conversations:
            for part in m["content"] if isinstance(m.get("content"), list) else ():
                if part.get("type") == "image":
                    shown.add(part["image"])
                elif part.get("type") == "video":
                    shown.update(part["frames"])
                    shown.update(f"{a}+{b}" for a, b in zip(part["frames"][::2], part["frames"][1::2]))
        self.images = {i: d for i, d in {**self.images, **given}.items() if i in shown}
        self._image_cells = {i: c for i, c in self._image_cells.items() if i in shown}
        self._image_at = {k: i for k, i in self._image_at.items() if i in shown}

    # --- cells ----------------------------------------------------------------------------------

    def cells(self, text: str, conversation: list[dict]) -> list[int]:
        """The context cells of `text`, a rendering of `conversation`: its tokens, and where the
        template put an image, the cells mtmd gives it (the image's parts, in order)."""
        slots = [m.group() for m in _MEDIA_SLOT.finditer(text)]
        if not slots:
            return self._model.tokenize(text)
        pieces = _MEDIA_SLOT.split(text)
        media = [part for m in conversation if isinstance(m.get("content"), list)
                 for part in m["content"] if part.get("type") in ("image", "video")]
        if [p["type"] for p in media] != ["image" if slot == IMAGE_SLOT else "video" for slot in slots]:
            raise ChatError(f"the conversation holds {len(media)} images and videos but its text {len(slots)} "
                            f"slots for them ({IMAGE_SLOT} typed in a message?)")
        cells = self._model.tokenize(pieces[0])
        for part, after in zip(media, pieces[1:]):
            cells += self.cells_of_video(part) if part["type"] == "video" else self.cells_of_image(part).cells
            cells += self._model.tokenize(after)
        return cells

    def _hold_frame(self, image_id: str, path: str | None) -> None:
        if image_id not in self.images:  # a conversation taken up from the journal: the file may still be there
            data = read_image(path)[0] if path else b""
            if hashlib.sha256(data).hexdigest() != image_id:
                raise ChatError(f"the conversation shows an image this session does not hold"
                                f"{' (' + path + ' changed or is gone)' if path else ''}")
            self.images[image_id] = data

    def cells_of_video(self, part: dict, name: str | None = None) -> list[int]:
        """A video's cells: per pair of frames, its timestamp and its cells as one image."""
        frames, paths = part["frames"], part.get("paths") or [None] * len(part["frames"])
        if len(frames) != 2 * len(part["seconds"]):
            raise ChatError("a video part must hold two frames for each of its timestamps")
        cells: list[int] = []
        for k, seconds in enumerate(part["seconds"]):
            pair = frames[2 * k:2 * k + 2]
            if pair[0] + "+" + pair[1] not in self._image_cells:
                for image_id, path in zip(pair, paths[2 * k:2 * k + 2]):
                    self._hold_frame(image_id, path)
            where = f"{name or 'the video'} (frames {2 * k + 1}-{2 * k + 2})"
            cells += self._model.tokenize(stamp(seconds)) + list(self._media_cells("+".join(pair), where).cells)
        if len(cells) >= self.n_ctx:
            raise ChatError(f"{name or 'the video'} takes {len(cells)} tokens, more than the {self.n_ctx}-token "
                            f"context holds: lower --image-max-tokens, give fewer frames or raise --ctx-size")
        return cells

    def cells_of_image(self, part: dict, name: str | None = None) -> ImageCells:
        image_id = part["image"]
        if image_id not in self._image_cells:
            self._hold_frame(image_id, part.get("path"))
        return self._media_cells(image_id, name or part.get("path"))

    def _media_cells(self, key: str, name: str | None) -> ImageCells:
        """The cells of an image (key: its SHA-256) or a video's frame pair (two, joined by "+"),
        from the bytes held."""
        found = self._image_cells.get(key)
        if found is not None:
            return found
        chunks = self._tokenize_image(key, name)
        (image,) = [c for c in chunks.items if c.is_image]
        marks = [c.tokens for c in chunks.items if not c.is_image]
        if image.n_tokens + 2 >= self.n_ctx:
            chunks.close()
            raise ChatError(f"{name or 'the image'} takes {image.n_tokens} tokens, more than the {self.n_ctx}-token "
                            f"context holds: lower --image-max-tokens or raise --ctx-size")
        stand_ins = image_cells(hashlib.sha256(key.encode()).digest() if "+" in key else bytes.fromhex(key),
                                image.n_tokens, image.n_pos)
        cells = ImageCells(tuple(marks[0]) + stand_ins + tuple(marks[1]), image.n_tokens, image.n_pos)
        self._image_cells[key] = cells
        self._image_at[stand_ins[0]] = key
        self._tokenized[key] = chunks  # evaluated by this turn, most likely
        return cells

    def _tokenize_image(self, key: str, name: str | None = None) -> Chunks:
        """mtmd's chunks for an image, or for a video's frame pair: two frames of one size marked
        mergeable, which mtmd makes one image of two temporal halves (video.py)."""
        projector = self.vision()
        frames = key.split("+")
        images = []
        try:
            for image_id in frames:
                images.append(projector.image(self.images[image_id], name=name, mergeable=len(frames) > 1))
            if len({(i.width, i.height) for i in images}) > 1:
                raise ChatError(f"{name}: the frames of a video must all be of one size, not "
                                f"{' and '.join(f'{i.width}x{i.height}' for i in images)}")
            chunks = projector.tokenize(projector.marker * len(images), images)
        finally:
            for image in images:
                image.close()
        kinds = [c.is_image for c in chunks.items]
        if kinds != [False, True, False]:  # <|vision_start|>, the image (or merged pair), <|vision_end|>
            chunks.close()
            raise ChatError(f"llama.cpp laid the image out as {kinds}, not start, image, end")
        return chunks

    # --- evaluating -----------------------------------------------------------------------------

    def evaluate(self, first_cell: int, ctx: native.Context, cache: StateCache) -> int:
        """Encode the image whose stand-ins start at `first_cell` into the context at the end of
        what `cache` holds; returns how many cells it takes (the caller records them as held)."""
        image_id = self._image_at[first_cell]
        image = self._image_cells[image_id]
        chunks = self._tokenized.pop(image_id, None) or self._tokenize_image(image_id)
        held = cache.tokens
        pos = position(held)
        start = time.perf_counter()
        try:
            chunk = chunks.items[1]
            if (chunk.n_tokens, chunk.n_pos) != (image.n_tokens, image.n_pos):
                raise ChatError("the image tokenized differently from before")
            try:
                end = self._projector.eval(ctx, chunk, pos, logits_last=False, cells=len(held))
            except ChatError:
                cache.clear()  # part of the image may be in the context: start from a known state
                raise
            # A wrong position raises nothing in llama.cpp (M-RoPE only needs positions to grow): check it.
            if end != pos + image.n_pos:
                cache.clear()
                raise ChatError(f"llama.cpp moved the position from {pos} to {end} over an image of "
                                f"{image.n_pos} positions")
        finally:
            chunks.close()
        self.work[0] += image.n_tokens
        self.work[1] += time.perf_counter() - start
        return image.n_tokens

    def free_tokenized(self) -> None:
        for chunks in self._tokenized.values():
            chunks.close()
        self._tokenized = {}

    def forget(self) -> None:
        """A conversation started over: no image is shown any more."""
        self.images = {}
        self.free_tokenized()

    def close(self) -> None:
        self.free_tokenized()
        if self._projector is not None:
            self._projector.close()
            self._projector = None
