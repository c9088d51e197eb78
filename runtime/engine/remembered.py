"""What the engine measured once on this machine, kept for next time.

Some facts cost seconds to learn and hold until the CPU, the llama.cpp build or the model file
changes: whether AMX computes right here (cpu.py) and what a drafting step costs here against a
plain one (speculative.py). Measuring them at every load would cost the user those seconds each
time, and a single timing taken at a noisy moment would decide differently from one load to the
next. So each kind is one JSON file under `$XDG_CACHE_HOME/qwen35/`, a key per case: the key says
what the fact was measured on (`build_key` hashes the CPU and the llama.cpp CPU library). A file
that cannot be read or written only means measuring again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/qwen35`, or $QWEN35_REMEMBERED_DIR (the tests keep theirs apart from the user's)."""
    override = os.environ.get("QWEN35_REMEMBERED_DIR")
    return Path(override) if override else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen35"


def build_key(library: Path, *parts: str) -> hashlib._Hash:
    """A hash of this CPU (model name, flags, microcode), the llama.cpp CPU library's bytes and
    `parts`; callers add what else their fact depends on."""
    h = hashlib.sha256()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "microcode")):
                h.update(line.encode())
                if line.startswith("microcode"):
                    break
    except OSError:
        pass
    h.update(library.read_bytes())
    for part in parts:
        h.update(part.encode())
    return h


def recall(kind: str, key: str) -> dict | None:
    """What was remembered under `key` in the file of `kind`, or None."""
    try:
        value = json.loads((cache_dir() / kind).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, dict) else None


def remember(kind: str, key: str, value: dict) -> None:
    """Keep `value` under `key` (written whole to a new file, then renamed: a reader never sees
    half of it)."""
    path = cache_dir() / kind
    try:
        try:
            known = json.loads(path.read_text())
            if not isinstance(known, dict):
                known = {}
        except (OSError, ValueError):
            known = {}
        known[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only means measuring again next time
