"""Hugging Face downloads, through huggingface_hub: the standard cache, HF_TOKEN, HF_HOME,
HF_HUB_OFFLINE and HF_ENDPOINT as every other tool honours them, downloads that survive a dropped
connection (huggingface_hub resumes a cut-off transfer with a range request; files already fetched
stay in the cache, so a command run again fetches only the rest), and each error of the hub said in
one line.

Only the files the converter reads are fetched (CHECKPOINT_FILES), never the whole repo. The free
disk is checked before a byte is fetched, and every large (LFS) file fetched is checked against the
SHA-256 the hub lists for it.

The environment is read at each call, not when huggingface_hub was imported, so HF_ENDPOINT or
HF_HUB_OFFLINE set later (a test, a long-lived process) still count.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError
from .names import ModelName

DEFAULT_ENDPOINT = "https://huggingface.co"
# What `qwen35 convert` reads from a checkpoint directory (convert/checkpoint.py, tokenizer.py,
# qwen35_vision.py), and nothing else: no other framework's weights, no original/ copies.
CHECKPOINT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json",
                    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                    "generation_config.json", "preprocessor_config.json", "processor_config.json", "README.md")
# A GGUF repo's files by quantization type, as llama.cpp's -hf matches them: the type in the name.
_GGUF_TYPE = re.compile(r"(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)(?=[-_.])", re.I)
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
MMPROJ_PREFERENCE = ("f16", "bf16", "f32", "q8_0")
HEADER_FETCH = 4 << 20  # bytes of a GGUF fetched first to read its header (then 4× more while it runs on)
_HASH_CHUNK = 16 << 20


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """huggingface_hub's cache, as it finds it: HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def _has_token() -> bool:
    from huggingface_hub import get_token

    return bool(get_token())


class Unreachable(ModelError):
    """The hub could not be asked (no network, HF_HUB_OFFLINE): the caller says what to copy where."""


@dataclass
class Listing:
    """A repo at one commit: its files and their sizes, and the SHA-256 of its large (LFS) files."""

    name: ModelName
    commit: str
    sizes: dict[str, int]
    sha256: dict[str, str] = field(default_factory=dict)
    gguf_architecture: str | None = None  # what the hub read from the repo's GGUF, if it said
    snapshot: Path | None = None  # set when the listing comes from the cache

    @property
    def is_gguf(self) -> bool:
        files = list(self.sizes)
        return any(f.endswith(".gguf") for f in files) and not any(f.endswith(".safetensors") for f in files)

    def checkpoint_files(self) -> list[str]:
        return [f for f in self.sizes if "/" not in f and any(fnmatch.fnmatch(f, p) for p in CHECKPOINT_FILES)]


@contextmanager
def hub_errors(name: ModelName):
    """huggingface_hub's and the network's exceptions as one ModelError line each."""
    import httpx2
    from huggingface_hub import errors as hf

    where = endpoint()
    try:
        yield
    except hf.GatedRepoError:
        raise ModelError(f"{name.repo} is gated: accept its terms at {where}/{name.repo}, then set HF_TOKEN to a "
                         "token of that account") from None
    except hf.RevisionNotFoundError:
        raise ModelError(f"{name.repo} has no revision {name.revision!r} (a branch, tag or commit of the repo)") from None
    except hf.RepositoryNotFoundError:
        if _has_token():
            raise ModelError(f"{name.repo} not found on {where}, or HF_TOKEN cannot read it") from None
        raise ModelError(f"{name.repo} not found on {where} (if it is private, set HF_TOKEN to a token that can "
                         "read it)") from None
    except hf.RemoteEntryNotFoundError as e:
        raise ModelError(f"{name.repo}: a file is missing on {where} ({_last_line(e)})") from None
    except hf.OfflineModeIsEnabled:
        raise Unreachable("HF_HUB_OFFLINE is set") from None
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
        raise Unreachable(f"cannot reach {where} ({_last_line(e) or type(e).__name__})") from None
    except httpx2.TransportError:  # the connection dropped mid-transfer, and huggingface_hub's retries too
        raise ModelError(f"the download of {name.repo} was cut off; run the command again to fetch the rest "
                         "(the files already fetched are kept)") from None
    except hf.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise ModelError(f"{where} refused access to {name.repo} ({status}): set HF_TOKEN to a token that can "
                             "read it") from None
        raise ModelError(f"{where} answered {status} for {name.repo}; try again later") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ModelError(f"no space left on the device of {cache_dir()} while downloading {name.repo}; free some "
                             "and run the command again (what was fetched is kept)") from None
        if "Consistency check failed" in str(e):
            raise ModelError(f"the download of {name.repo} was cut off; run the command again to fetch the rest "
                             "(the files already fetched are kept)") from None
        raise


def _last_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def list_repo(name: ModelName) -> Listing:
    """The repo's files at `name.revision` (default branch), from the hub. Raises Unreachable when
    the hub cannot be asked."""
    from huggingface_hub import HfApi

    if offline():
        raise Unreachable("HF_HUB_OFFLINE is set")
    with hub_errors(name):
        info = HfApi(endpoint=endpoint()).model_info(name.repo, revision=name.revision, files_metadata=True)
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) or 0 for s in info.siblings or []}
    sha256 = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs}
    gguf = info.gguf if isinstance(info.gguf, dict) else {}
    return Listing(name, info.sha, sizes, sha256, gguf.get("architecture"))


def cached_listing(name: ModelName) -> Listing | None:
    """The repo as the cache holds it (the snapshot the revision points to), without the network."""
    storage = cache_dir() / f"models--{name.repo.replace('/', '--')}"
    revision = name.revision or "main"
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    if commit is None:
        ref = storage / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    sizes = {str(p.relative_to(snapshot)): p.stat().st_size for p in snapshot.rglob("*") if p.is_file()}
    return Listing(name, commit, sizes, snapshot=snapshot)


def missing_files(listing: Listing, files: list[str]) -> list[str]:
    snapshot = snapshot_dir(listing)
    return [f for f in files if not (snapshot / f).is_file()]


def snapshot_dir(listing: Listing) -> Path:
    return listing.snapshot or cache_dir() / f"models--{listing.name.repo.replace('/', '--')}" / "snapshots" / listing.commit


def download(listing: Listing, files: list[str], also_needed: dict[Path, int] | None = None) -> Path:
    """Fetch `files` of the listing's commit into the cache (those not there yet), after checking the
    disk holds them and `also_needed` (more bytes to be written per directory: the conversion's
    output); returns the snapshot directory. Each LFS file fetched is checked against its SHA-256."""
    from huggingface_hub import hf_hub_download

    todo = missing_files(listing, files)
    if todo and listing.snapshot is not None:  # a cache-only listing cannot fetch
        raise Unreachable(f"{todo[0]} of {listing.name.repo} is not in the cache")
    check_disk({cache_dir(): sum(listing.sizes.get(f, 0) for f in todo), **(also_needed or {})})
    for f in sorted(todo, key=lambda f: listing.sizes.get(f, 0)):  # the small files first, the weights last
        with hub_errors(listing.name):
            path = hf_hub_download(listing.name.repo, f, revision=listing.commit, cache_dir=cache_dir(),
                                   endpoint=endpoint())
        expected = listing.sha256.get(f)
        if expected:
            verify_sha256(Path(path), expected, f"{listing.name.repo}/{f}")
    _remember_revision(listing)
    return snapshot_dir(listing)


def _remember_revision(listing: Listing) -> None:
    """refs/<revision> → the commit, as huggingface_hub records a branch or tag it resolved (files are
    fetched by commit, so a branch moving during a download cannot mix two commits' files): then an
    offline run finds the snapshot by the name's revision."""
    revision = listing.name.revision or "main"
    if listing.snapshot is not None or revision == listing.commit:
        return
    ref = cache_dir() / f"models--{listing.name.repo.replace('/', '--')}" / "refs" / revision
    if not ref.is_file() or ref.read_text() != listing.commit:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(listing.commit)


def verify_sha256(path: Path, expected: str, label: str) -> None:
    """The file against the hub's SHA-256; a corrupt one is removed from the cache (blob and link),
    so the next try fetches it again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise ModelError(f"{label} does not match the hub's SHA-256 (a corrupted download); removed it, run the "
                         "command again")


def check_disk(needs: dict[Path, int]) -> None:
    """Each filesystem holds what is to be written on it (directories on one filesystem add up)."""
    by_device: dict[int, tuple[Path, int]] = {}
    for directory, need in needs.items():
        existing = Path(directory)
        while not existing.exists():
            existing = existing.parent
        device = existing.stat().st_dev
        first, total = by_device.get(device, (existing, 0))
        by_device[device] = (first, total + need)
    for directory, need in by_device.values():
        free = shutil.disk_usage(directory).free
        if need > free:
            raise ModelError(f"not enough disk space: {need / 1e9:.1f} GB to download and write on the filesystem of "
                             f"{directory}, {free / 1e9:.1f} GB free")


# --- repos of GGUF files ---------------------------------------------------------------------------


def gguf_type(file_name: str) -> str | None:
    """`Qwen3.5-4B-Q4_K_M.gguf` → `q4_k_m` (the last type named in the file name)."""
    found = _GGUF_TYPE.findall(Path(file_name).name)
    return found[-1].lower() if found else None


def is_mmproj(file_name: str) -> bool:
    return "mmproj" in Path(file_name).name.lower()


def gguf_types(listing: Listing) -> dict[str, list[str]]:
    """{type: its files} of a GGUF repo's models (the parts of a split model together, first first)."""
    found: dict[str, list[str]] = {}
    for f in sorted(listing.sizes):
        if f.endswith(".gguf") and not is_mmproj(f):
            t = gguf_type(_SPLIT.sub(".gguf", f))
            if t:
                found.setdefault(t, []).append(f)
    return found


def gguf_header(listing: Listing, files: list[str]):
    """The header of a GGUF in the repo (its parts' together, for a split one) as the runtime's
    ModelFile, without downloading it: from the cache when it is there, else from the start of each
    file, fetched with range requests (4 MiB, then more while the header runs on: the vocabulary is
    most of it)."""
    from ..gguf_header import HEADER_TRUNCATED, GGUFFormatError, read_header, read_header_prefix
    from ..runtime.engine.modelfile import ModelFile

    headers = []
    for f in files:
        cached, size = snapshot_dir(listing) / f, listing.sizes.get(f, 0)
        label = f"{listing.name.repo}/{f}"
        try:
            if cached.is_file():
                headers.append(read_header(cached))
                continue
            n = HEADER_FETCH
            while True:
                data = _fetch_start(listing, f, n)
                try:
                    headers.append(read_header_prefix(data, label, size))
                    break
                except GGUFFormatError as e:
                    if HEADER_TRUNCATED not in str(e) or len(data) < n or n >= size:
                        raise
                    n *= 4
        except GGUFFormatError as e:
            raise ModelError(str(e)) from None
    first = headers[0]
    return ModelFile(first.path, sum(h.file_size for h in headers), first.metadata,
                     [t for h in headers for t in h.tensors], first.array_length("tokenizer.ggml.tokens"))


def _fetch_start(listing: Listing, file: str, n: int) -> bytes:
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(listing.name.repo, file, revision=listing.commit, endpoint=endpoint())
    with hub_errors(listing.name):
        response = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes=0-{n - 1}"},
                                     follow_redirects=True)
        hf_raise_for_status(response)
    return response.content[:n]


def pick_mmproj(listing: Listing) -> str | None:
    """The repo's vision tower, F16 first (what `qwen35 convert` writes), or None."""
    mmprojs = [f for f in listing.sizes if f.endswith(".gguf") and is_mmproj(f)]
    rank = {t: i for i, t in enumerate(MMPROJ_PREFERENCE)}
    return min(mmprojs, key=lambda f: (rank.get(gguf_type(f) or "", len(rank)), f), default=None)
