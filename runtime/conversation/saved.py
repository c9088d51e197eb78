"""Conversations saved with their model state (`ChatSession.save`, `/save` in the REPL), and read back.

The file: a magic line, the length of a JSON header, the header (the model's fingerprint, the
conversation and its settings, the tokens the state holds), the state, the deepest turn checkpoint,
and the images the conversation shows. Written to a `.part` file and renamed: a crash never leaves
half a file under the name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..engine.errors import ChatError
from ..engine.modelfile import ModelFile

MAGIC = b"QWEN35-CHAT\n"
VERSION = 2  # 2: the conversation's images follow the states


def write_session(path, header: dict, state: bytes, checkpoint: bytes, images: dict[str, bytes]) -> None:
    header = {"version": VERSION, **header, "state_bytes": len(state), "checkpoint_bytes": len(checkpoint),
              "images": [[image_id, len(data)] for image_id, data in images.items()]}
    data = json.dumps(header, ensure_ascii=False).encode()
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            for part in (MAGIC, len(data).to_bytes(8, "little"), data, state, checkpoint, *images.values()):
                f.write(part)
        tmp.replace(path)
    except OSError as e:
        raise ChatError(f"cannot save the conversation to {path}: {e.strerror}") from None


def fingerprint(mf: ModelFile) -> dict:
    """Enough to tell model files apart without hashing gigabytes: name, size, and a hash of the
    header and of the last MiB of tensor data."""
    h = hashlib.sha256()
    with open(mf.path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, mf.size - (1 << 20)))
        h.update(f.read())
    return {"name": mf.path.name, "size": mf.size, "sha256": h.hexdigest()}


def read_session(path: Path) -> tuple[dict, bytes, bytes, dict[str, bytes]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ChatError(f"{path} does not exist") from None
    except OSError as e:
        raise ChatError(f"cannot read {path}: {e.strerror}") from None
    if not data.startswith(MAGIC):
        raise ChatError(f"{path} is not a conversation saved by qwen35 (/save FILE writes one)")
    try:
        start = len(MAGIC) + 8
        n = int.from_bytes(data[len(MAGIC):start], "little")
        header = json.loads(data[start:start + n])
        start += n
        state = data[start:start + header["state_bytes"]]
        start += header["state_bytes"]
        checkpoint = data[start:start + header["checkpoint_bytes"]]
        start += header["checkpoint_bytes"]
        images = {}
        for image_id, n in header.get("images", []):  # (version 1 had none)
            images[image_id] = data[start:start + n]
            start += n
        if header.get("version") not in (1, VERSION) or len(state) != header["state_bytes"] \
                or len(checkpoint) != header["checkpoint_bytes"] or start != len(data) \
                or any(hashlib.sha256(d).hexdigest() != i for i, d in images.items()):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ChatError(f"{path} is damaged or was written by another version of qwen35") from None
    return header, state, checkpoint, images
