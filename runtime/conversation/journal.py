"""The interactive chat kept on disk as it goes, so that a dying process loses nothing the user typed.

A native crash, the OOM killer or a board's power cut ends the process without a word. So before
each reply starts (with the message just typed) and after it ends, the REPL rewrites its journal —
`$XDG_STATE_HOME/qwen35/conversations/<started>-<model>.json` — atomically: a temporary file,
fsync, rename. A clean exit also saves the model state beside it (`ChatSession.save`), so
`qwen35 run MODEL --resume` takes the last conversation with that model up without re-reading it;
after a crash there is no state file, and the conversation is evaluated once, in the background
while the user types. The journal is JSON: a person can read it, and it stays small.

`qwen35 serve`'s chat page keeps its conversations in the same files, in the same format (one store:
a conversation started in the browser is taken up by `qwen35 run --resume`, and the other way
round). A conversation may carry a `title` (the page gives one to each it starts, and renames);
`qwen35 run` prunes only untitled ones, keeping the last KEEP: a titled conversation stays until it
is deleted. An assistant message may carry `stats`, the figures of the reply (the template never
reads them).

Images are kept beside it, in `<journal>.images/<SHA-256>` (written once each, atomically, at most
IMAGE_BUDGET bytes a conversation): the journal names them, so a conversation taken up after a
crash shows the model its images again even if they came as bytes or their files have moved, and
/retry re-sends an unanswered message with the images (and the video) it had. Past the budget, an
image is found again by its path only.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

from ..engine.errors import ChatError

VERSION = 1
KEEP = 20  # untitled journals kept; the oldest are removed when a new chat starts in `qwen35 run`
IMAGE_BUDGET = 64 << 20  # bytes of images kept beside one journal


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "qwen35" / "conversations"


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash or power cut leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself
        finally:
            os.close(fd)
    except OSError:
        pass


class Journal:
    """One interactive conversation's file. `record(session, pending=…)` after every change."""

    def __init__(self, path: Path, model: dict) -> None:
        self.path = path
        self.model = model  # the model file's fingerprint (ChatSession.model_fingerprint)
        self.started = datetime.now().isoformat(timespec="seconds")
        self.title: str | None = None
        self.failed: str | None = None  # why the last write failed, told once

    @classmethod
    def new(cls, model_name: str, model: dict, directory: Path | None = None, *, prune: bool = True) -> "Journal":
        directory = directory or state_dir()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        journal = cls(directory / f"{stamp}-{Path(model_name).stem}.json", model)
        if prune:
            _prune(directory)
        return journal

    @classmethod
    def of(cls, path: Path, entry: dict) -> "Journal":
        """The journal of an entry read from `path` (its model, start and title kept)."""
        journal = cls(path, entry.get("model"))
        journal.started = entry.get("started", journal.started)
        journal.title = entry.get("title")
        return journal

    @property
    def id(self) -> str:
        return self.path.stem

    @property
    def state_path(self) -> Path:
        return self.path.with_suffix(".session")

    @property
    def images_dir(self) -> Path:
        return self.path.with_suffix(".images")

    def record(self, session, *, pending: str | None = None, images=(), video: str | None = None) -> str | None:
        """Write the conversation (and `pending`, a message whose reply has not ended, with its
        `images`, paths or bytes, and `video`, a path), and keep the images it shows beside it.
        Returns a warning the first time writing fails; the chat goes on without a journal rather
        than stop."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if images or video:
                pending = {"text": pending, "images": [self._pending_image(i) for i in images],
                           "video": str(Path(video).resolve()) if video else None}
            self.write(session.messages, system=session.system, think=session.think, pending=pending,
                       image_bytes=lambda image_id: session.image_bytes(image_id))
        except OSError as e:
            if self.failed is None:
                self.failed = f"cannot keep the conversation in {self.path.parent}: {e.strerror}"
                return self.failed
        return None

    def write(self, messages: list[dict], *, system: str | None, think: bool | None, pending=None,
              image_bytes=lambda image_id: None) -> None:
        """Write the conversation (raises OSError), keeping beside it the images its messages show
        (`image_bytes(SHA-256)` gives their files; one already kept needs none). `pending`: as the
        journal keeps it (record's, or {"text", "images": [{"image": SHA-256}]})."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for image_id in _shown_images(messages):
            data = image_bytes(image_id)
            if data is not None:
                self._keep(data)
        entry = {"version": VERSION, "model": self.model, "started": self.started,
                 "updated": datetime.now().isoformat(timespec="seconds"), "system": system,
                 "think": think, "messages": messages, "pending": pending}
        if self.title:
            entry["title"] = self.title
        write_atomically(self.path, json.dumps(entry, ensure_ascii=False, indent=1).encode())
        self.state_path.unlink(missing_ok=True)  # a saved state is only good for the conversation it saved

    def retitle(self, entry: dict, title: str | None) -> None:
        """Name the conversation (None: no name); it keeps its place among the others ("updated")."""
        self.title = title
        entry = {k: v for k, v in entry.items() if k != "title"}
        if title:
            entry["title"] = title
        write_atomically(self.path, json.dumps(entry, ensure_ascii=False, indent=1).encode())

    def delete(self) -> None:
        """Remove the conversation, its saved model state and its images."""
        _remove(self.path)

    def keep_image(self, data: bytes) -> str:
        """Keep an image beside the journal now (within the budget); its SHA-256."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self._keep(data)

    def _keep(self, data: bytes) -> str:
        """Keep an image beside the journal (once; within the budget); its SHA-256."""
        image_id = hashlib.sha256(data).hexdigest()
        path = self.images_dir / image_id
        if not path.exists():
            held = sum(p.stat().st_size for p in self.images_dir.glob("*")) if self.images_dir.is_dir() else 0
            if held + len(data) <= IMAGE_BUDGET:
                self.images_dir.mkdir(exist_ok=True)
                write_atomically(path, data)
        return image_id

    def _pending_image(self, source) -> dict:
        if isinstance(source, (bytes, bytearray)):
            return {"image": self._keep(bytes(source))}
        return {"image": self._keep(Path(source).read_bytes()), "path": str(Path(source).resolve())}

    def images(self) -> dict[str, bytes]:
        """The images kept beside the journal, by SHA-256 (a damaged one is left out)."""
        found = {}
        for path in sorted(self.images_dir.glob("*")) if self.images_dir.is_dir() else ():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if hashlib.sha256(data).hexdigest() == path.name:
                found[path.name] = data
        return found

    def pending_message(self, pending) -> tuple[str, list, str | None] | None:
        """The text, images (bytes, or paths when not kept) and video of an unanswered message."""
        if pending is None or isinstance(pending, str):
            return None if pending is None else (pending, [], None)
        kept = self.images()
        images = [kept.get(i["image"], i.get("path")) for i in pending.get("images", [])]
        return (pending["text"], [i for i in images if i is not None],
                pending.get("video"))

    def save_state(self, session) -> None:
        """On a clean exit: the model state too, so a resume evaluates nothing."""
        if session.messages:
            try:
                session.save(self.state_path)
            except ChatError:
                pass  # the journal alone still resumes the conversation


def read(path: Path) -> dict | None:
    """A journal's entry, or None if the file is not one (or cannot be read)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("version") != VERSION or not isinstance(entry.get("messages"), list):
        return None
    return entry


def conversations(model: dict, directory: Path | None = None) -> list[tuple[Journal, dict]]:
    """Every journal of a conversation with this model file, and its entry, the latest updated first."""
    found = []
    for path in (directory or state_dir()).glob("*.json"):
        entry = read(path)
        if entry is not None and entry.get("model") == model:
            found.append((path, entry))
    found.sort(key=lambda item: (item[1].get("updated", ""), item[0].name), reverse=True)
    return [(Journal.of(path, entry), entry) for path, entry in found]


def latest(model: dict, directory: Path | None = None) -> tuple[Journal, dict] | None:
    """The most recently updated journal of a conversation with this model file, and its entry."""
    found = conversations(model, directory)
    return found[0] if found else None


def title_of(entry: dict) -> str:
    """The conversation's title, or the start of its first message."""
    if entry.get("title"):
        return entry["title"]
    for message in entry.get("messages", []):
        if message.get("role") == "user":
            content = message.get("content")
            text = content if isinstance(content, str) else \
                " ".join(p.get("text", "") for p in content or () if p.get("type") == "text")
            text = " ".join(text.split())
            if text:
                return text[:60] + ("…" if len(text) > 60 else "")
    pending = entry.get("pending")
    text = pending if isinstance(pending, str) else (pending or {}).get("text") or ""
    return " ".join(text.split())[:60] or "New conversation"


def resume(session, journal: Journal, entry: dict) -> str:
    """Take the conversation up in `session`: from the saved model state when it matches the
    journal, else by evaluating it once. Returns how, for the user."""
    if journal.state_path.is_file():
        try:
            session.load(journal.state_path)
            if session.messages == entry["messages"]:
                return "model state restored"
        except ChatError:
            pass
    session.restore(entry["messages"], system=entry.get("system"), think=entry.get("think"),
                    images=journal.images().values())
    return "its model state was not saved, so it is evaluated once"


def _prune(directory: Path) -> None:
    """Keep the last KEEP - 1 untitled journals (a new one is about to start); titled ones stay."""
    try:
        journals = sorted(path for path in directory.glob("*.json") if not (read(path) or {}).get("title"))
    except OSError:
        return
    for old in journals[:max(0, len(journals) - (KEEP - 1))]:
        _remove(old)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".session").unlink(missing_ok=True)
    kept = path.with_suffix(".images")
    for image in kept.glob("*") if kept.is_dir() else ():
        image.unlink(missing_ok=True)
    if kept.is_dir():
        kept.rmdir()


def _shown_images(messages: list[dict]) -> list[str]:
    """The SHA-256 of every image (and video frame) the messages show."""
    ids = []
    for message in messages:
        for part in message["content"] if isinstance(message.get("content"), list) else ():
            ids += [part["image"]] if part.get("type") == "image" else part.get("frames", [])
    return list(dict.fromkeys(ids))
