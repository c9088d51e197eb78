"""The interactive chat kept on disk as it goes, so that a dying process loses nothing the user typed.

A native crash, the OOM killer or a board's power cut ends the process without a word. So before
each reply starts (with the message just typed) and after it ends, the REPL rewrites its journal —
`$XDG_STATE_HOME/qwen35/conversations/<started>-<model>.json` — atomically: a temporary file,
fsync, rename. A clean exit also saves the model state beside it (`ChatSession.save`), so
`qwen35 run MODEL --resume` takes the last conversation with that model up without re-reading it;
after a crash there is no state file, and the conversation is evaluated once, in the background
while the user types. The journal is JSON: a person can read it, and it stays small.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from .errors import ChatError

VERSION = 1
KEEP = 20  # journals kept; the oldest are removed when a new chat starts


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
        self.failed: str | None = None  # why the last write failed, told once

    @classmethod
    def new(cls, model_name: str, model: dict, directory: Path | None = None) -> "Journal":
        directory = directory or state_dir()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        journal = cls(directory / f"{stamp}-{Path(model_name).stem}.json", model)
        _prune(directory)
        return journal

    @property
    def state_path(self) -> Path:
        return self.path.with_suffix(".session")

    def record(self, session, *, pending: str | None = None) -> str | None:
        """Write the conversation (and `pending`, a message whose reply has not ended). Returns a
        warning the first time writing fails; the chat goes on without a journal rather than stop."""
        entry = {"version": VERSION, "model": self.model, "started": self.started,
                 "updated": datetime.now().isoformat(timespec="seconds"), "system": session.system,
                 "think": session.think, "messages": session.messages, "pending": pending}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(entry, ensure_ascii=False, indent=1).encode())
            self.state_path.unlink(missing_ok=True)  # a saved state is only good for the conversation it saved
        except OSError as e:
            if self.failed is None:
                self.failed = f"cannot keep the conversation in {self.path.parent}: {e.strerror}"
                return self.failed
        return None

    def save_state(self, session) -> None:
        """On a clean exit: the model state too, so a resume evaluates nothing."""
        if session.messages:
            try:
                session.save(self.state_path)
            except ChatError:
                pass  # the journal alone still resumes the conversation


def latest(model: dict, directory: Path | None = None) -> tuple[Journal, dict] | None:
    """The most recently updated journal of a conversation with this model file, and its entry."""
    best = None
    for path in (directory or state_dir()).glob("*.json"):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("version") == VERSION and entry.get("model") == model and entry.get("messages") is not None:
            if best is None or (entry["updated"], path.name) > (best[1]["updated"], best[0].name):
                best = (path, entry)
    if best is None:
        return None
    journal = Journal(best[0], model)
    journal.started = best[1].get("started", journal.started)
    return journal, best[1]


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
    session.restore(entry["messages"], system=entry.get("system"), think=entry.get("think"))
    return "its model state was not saved, so it is evaluated once"


def _prune(directory: Path) -> None:
    try:
        journals = sorted(directory.glob("*.json"))
    except OSError:
        return
    for old in journals[:max(0, len(journals) - (KEEP - 1))]:
        old.unlink(missing_ok=True)
        old.with_suffix(".session").unlink(missing_ok=True)
