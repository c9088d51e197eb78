"""The local model store: `qwen35 pull` puts a model there, `run NAME` finds it there, `list` and `rm`.

Where: $QWEN35_MODELS, else $XDG_DATA_HOME/qwen35/models (~/.local/share/qwen35/models). One directory
per repo and profile (`Qwen/Qwen3.5-4B/q4_k_m/`), holding model.json (what it is and where it came
from) and the GGUF files `qwen35 convert` wrote, named as it names them, so the mmproj is found
beside the model as for any converted file. A repo of GGUF files is not copied: its entry points at
the files in the Hugging Face cache.

Nothing half-written: a pull converts into `.pulling-<pid>/` in the store and renames it into place
when everything is written; a pull that dies leaves only that directory, removed by the next pull.
The checkpoint a pull converts stays in the Hugging Face cache (another profile of it converts
without a download; `hf cache` commands free it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .errors import ModelError
from .fit import Machine, choose_profile, profile_order
from .names import ModelName, parse

MANIFEST = "model.json"
DEFAULT_CTX = 4096  # `qwen35 run`'s default context


def models_dir() -> Path:
    if os.environ.get("QWEN35_MODELS"):
        return Path(os.path.expanduser(os.environ["QWEN35_MODELS"]))
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "qwen35" / "models"


@dataclass(frozen=True)
class StoredModel:
    directory: Path
    manifest: dict

    @property
    def repo(self) -> str:
        return self.manifest["repo"]

    @property
    def profile(self) -> str:
        return self.manifest["profile"]

    @property
    def name(self) -> ModelName:
        return ModelName(self.repo, None, self.profile)

    @property
    def model(self) -> Path:
        return self.directory / self.manifest["model"]  # an absolute path (a GGUF repo's) stays as it is

    @property
    def mmproj(self) -> Path | None:
        return self.directory / self.manifest["mmproj"] if self.manifest.get("mmproj") else None

    def files(self) -> list[Path]:
        return [self.model] + [self.directory / f for f in self.manifest.get("parts", [])] + \
            ([self.mmproj] if self.mmproj else [])

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files() if p.is_file())


def entry_dir(repo: str, profile: str) -> Path:
    return models_dir() / repo / profile.lower()


def entries() -> list[StoredModel]:
    root = models_dir()
    found = []
    for manifest in sorted(root.glob(f"*/*/*/{MANIFEST}")):
        try:
            found.append(StoredModel(manifest.parent, json.loads(manifest.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue  # not ours, or damaged: `list` shows what it can read
    return found


def lookup(name: ModelName) -> list[StoredModel]:
    """The stored profiles of `name`'s repo (only its tag, when it has one), best quality first."""
    rank = {p: i for i, p in enumerate(profile_order())}
    found = [e for e in entries() if e.repo.lower() == name.repo.lower()
             and (name.tag is None or e.profile.lower() == name.tag.lower())
             and (name.revision is None or name.revision in (e.manifest.get("revision"), e.manifest.get("commit")))]
    return sorted(found, key=lambda e: rank.get(e.profile, len(rank)))


def remove(name: ModelName) -> list[StoredModel]:
    gone = lookup(name)
    for entry in gone:
        shutil.rmtree(entry.directory)
        for parent in (entry.directory.parent, entry.directory.parent.parent):
            if parent != models_dir() and not any(parent.iterdir()):
                parent.rmdir()
    return gone


def _clean_abandoned(root: Path) -> None:
    """Remove what pulls that died left (`.pulling-<pid>` of a process that is gone)."""
    for partial in root.glob(".pulling-*"):
        try:
            os.kill(int(partial.name.split("-")[-1]), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _install(staging: Path, target: Path) -> None:
    """Put a finished entry in place of any older one of the same repo and profile."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)


def not_here(name: ModelName, why: str) -> ModelError:
    """What to do when a name is in neither the store nor the cache and the hub cannot be asked."""
    return ModelError(f"{name} is not in the model store ({models_dir()}) or the Hugging Face cache, and {why}: run "
                      f"`qwen35 pull {name}` on a machine with network and copy its directory from that machine's "
                      f"store into {models_dir()}, or copy the GGUF here and run it by path (docs/models.md)")


def pull(name: ModelName, *, n_ctx: int = DEFAULT_CTX, machine: Machine | None = None, prefer_cache: bool = False,
         say=None, cache_ram: int | None = None) -> StoredModel:
    """Download `name` (into the Hugging Face cache) and convert it into the store, or take its GGUF
    files from a GGUF repo; the profile fitted to this machine at `n_ctx` when the name gives none.
    `cache_ram`: the checkpoint cache the model will run with (`serve --cache-ram`; default run's).
    `prefer_cache`: use what the cache holds without asking the hub for a newer commit (`run`);
    otherwise the hub is asked and an entry already at its commit is kept as it is (`pull`)."""
    say = say or (lambda line: print(line, file=sys.stderr))
    listing = _listing(name, prefer_cache)
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    _clean_abandoned(root)
    if listing.is_gguf:
        return _take_gguf_repo(name, listing, n_ctx, machine, say, cache_ram)
    return _convert_checkpoint(name, listing, n_ctx, machine, say, cache_ram)


def _listing(name: ModelName, prefer_cache: bool) -> hub.Listing:
    cached = hub.cached_listing(name)
    if prefer_cache and cached is not None and _complete(cached):
        return cached
    try:
        return hub.list_repo(name)
    except hub.Unreachable as e:
        if cached is not None and _complete(cached):
            return cached
        raise not_here(name, str(e)) from None


def _complete(listing: hub.Listing) -> bool:
    """Whether a cached snapshot holds a whole checkpoint (config and every shard) or a GGUF."""
    snapshot = hub.snapshot_dir(listing)
    if listing.is_gguf:
        return True
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except ValueError:
            return False
        return (snapshot / "config.json").is_file() and all((snapshot / s).is_file() for s in shards)
    return (snapshot / "config.json").is_file() and (snapshot / "model.safetensors").is_file()


def _release_config(name: ModelName, listing: hub.Listing) -> dict:
    """config.json of a checkpoint repo (fetched first, alone), checked to be a Qwen3.5 model's."""
    from ..convert import qwen35
    from ..convert.errors import ConvertError

    if listing.is_gguf:
        raise ModelError(f"{name.repo} is a repo of GGUF files, not a checkpoint: run it (`qwen35 run {name}`) or "
                         "pull it")
    if "config.json" not in listing.sizes:
        raise ModelError(f"{name.repo} has no config.json: it is not a Hugging Face checkpoint of Qwen3.5")
    snapshot = hub.download(listing, ["config.json"])
    try:
        config = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    except ValueError:
        raise ModelError(f"{name.repo}'s config.json is not valid JSON") from None
    try:
        qwen35.architecture({**config, **(config.get("text_config") or {})})
    except ConvertError:
        found = ", ".join(config.get("architectures") or []) or "none given"
        raise ModelError(f"{name.repo} is not a Qwen3.5 model (its architecture: {found}); qwen35 runs Qwen3.5 and "
                         "Qwen3.6 checkpoints, or repos of their GGUF files") from None
    return config


def checkpoint(name: ModelName, profiles: list[str], output: str | None) -> Path:
    """The checkpoint directory of `name` for `qwen35 convert`: from the cache, or downloaded into it
    (the disk checked first for the download and the `profiles`' output, convert's -o `output`)."""
    output_dir = Path(".") if output is None else \
        Path(output) if str(output).endswith(("/", os.sep)) or Path(output).is_dir() else Path(output).parent
    name = name.with_tag(None)  # the profile is convert's -q
    listing = _listing(name, prefer_cache=True)
    config = _release_config(name, listing)
    try:
        output = sum(_output_size(config, p) for p in profiles)
    except ModelError:
        output = 0  # a profile of the user's own: convert checks the space it needs before writing
    return hub.download(listing, listing.checkpoint_files(), also_needed={output_dir: output})


def _convert_checkpoint(name: ModelName, listing: hub.Listing, n_ctx: int, machine: Machine | None, say,
                        cache_ram: int | None) -> StoredModel:
    from ..convert import profiles
    from ..convert.checkpoint import load_config
    from ..convert.errors import ConvertError
    from ..convert.pipeline import Conversion, terminal_progress

    config = _release_config(name, listing)
    if name.tag:
        try:
            profile = profiles.load(name.tag).name
        except ConvertError as e:
            raise ModelError(str(e)) from None
    else:
        fit = choose_profile(config, name.label, n_ctx, machine or Machine.this(), cache_ram)
        say(fit.reason)
        if fit.profile is None:
            raise ModelError(fit.reason)
        profile = fit.profile
    target = entry_dir(name.repo, profile)
    existing = lookup(name.with_tag(profile))
    if existing and existing[0].manifest.get("commit") == listing.commit and existing[0].model.is_file():
        say(f"{name.repo}:{profile} is up to date ({listing.commit[:12]})")
        return existing[0]

    files = listing.checkpoint_files()
    output = _output_size(config, profile)
    staging = models_dir() / f".pulling-{os.getpid()}"
    snapshot = hub.download(listing, files, also_needed={models_dir(): output})
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        load_config(snapshot)  # a damaged config says so here, in one line
        conversion = Conversion(snapshot, [profile], str(staging) + os.sep, mmproj="f16", name=name.label)
        outputs = conversion.run(None, terminal_progress())
        model, *rest = outputs
        manifest = {"repo": name.repo, "revision": name.revision or "main", "commit": listing.commit,
                    "profile": profile, "source": "converted", "model": model.path.name,
                    "mmproj": rest[0].path.name if rest else None, "pulled": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_manifest(staging, manifest)
        _install(staging, target)
    except ConvertError as e:
        raise ModelError(f"{name.repo}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entry = StoredModel(target, json.loads((target / MANIFEST).read_text()))
    say(f"{name.repo}:{profile} is in the store: {entry.model} ({entry.size() / 1e9:.2f} GB)")
    return entry


def _output_size(config: dict, profile: str) -> int:
    """Bytes `qwen35 convert -q PROFILE` writes for this config (tensor data; the header is small)."""
    from ..convert.errors import ConvertError
    from ..runtime.engine import memory
    from .fit import release_mmproj, release_model

    base = release_model(config)
    try:
        mf = base if profile == "bf16" else memory.as_profile(base, profile)
    except ConvertError as e:
        raise ModelError(str(e)) from None
    mmproj = release_mmproj(config)
    return sum(t.nbytes for t in mf.tensors) + (sum(t.nbytes for t in mmproj.tensors) if mmproj else 0) + (64 << 20)


def _take_gguf_repo(name: ModelName, listing: hub.Listing, n_ctx: int, machine: Machine | None, say,
                    cache_ram: int | None) -> StoredModel:
    """A repo of GGUF files: the type the name asks for, or the best that fits (judged on the files'
    headers, fetched alone), checked to be Qwen3.5 before the weights are downloaded."""
    from ..runtime.engine.modelfile import QWEN35_ARCHS
    from .fit import choose_gguf

    types = hub.gguf_types(listing)
    if not types:
        raise ModelError(f"{name.repo} has no model GGUF files")
    if listing.gguf_architecture and listing.gguf_architecture not in QWEN35_ARCHS:
        raise ModelError(f"{name.repo} is not a Qwen3.5 model (its GGUF architecture: {listing.gguf_architecture})")
    mmproj = hub.pick_mmproj(listing)
    headers = {}

    def header(tag: str):
        if tag not in headers:
            headers[tag] = hub.gguf_header(listing, types[tag])
            if headers[tag].architecture not in QWEN35_ARCHS:
                raise ModelError(f"{name.repo} is not a Qwen3.5 model (its GGUF architecture: "
                                 f"{headers[tag].architecture or 'none given'})")
        return headers[tag]

    if name.tag:
        tag = name.tag
        if tag not in types:
            raise ModelError(f"{name.repo} has no {tag.upper()} file: choose one of "
                             f"{', '.join(t.upper() for t in types)} ({name.repo}:{next(iter(types)).upper()})")
    else:
        sizes = {t: sum(listing.sizes.get(f, 0) for f in files) for t, files in types.items()}
        chosen = choose_gguf(sizes, header, hub.gguf_header(listing, [mmproj]) if mmproj else None, name.label,
                             n_ctx, machine or Machine.this(), cache_ram)
        say(chosen.reason)
        if chosen.profile is None:
            raise ModelError(chosen.reason)
        tag = chosen.profile
    header(tag)  # a repo of another architecture's GGUFs is refused before its weights are downloaded
    files = types[tag]
    snapshot = hub.download(listing, files + ([mmproj] if mmproj else []))
    staging = models_dir() / f".pulling-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = {"repo": name.repo, "revision": name.revision or "main", "commit": listing.commit, "profile": tag,
                    "source": "gguf repo", "model": str((snapshot / files[0]).absolute()),
                    "parts": [str((snapshot / f).absolute()) for f in files[1:]],
                    "mmproj": str((snapshot / mmproj).absolute()) if mmproj else None,
                    "pulled": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_manifest(staging, manifest)
        _install(staging, entry_dir(name.repo, tag))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entry = lookup(name.with_tag(tag))[0]
    say(f"{name.repo}:{tag} is in the store (its files stay in the Hugging Face cache: {snapshot})")
    return entry


def resolve(text: str, *, n_ctx: int = DEFAULT_CTX, assume_yes: bool = False, confirm=None,
            machine: Machine | None = None, cache_ram: int | None = None) -> tuple[str, Path | None]:
    """(GGUF path, mmproj path or None) for what a command was given: an existing path as it is (no
    mmproj: the runtime looks beside it), a name from the store, or a name pulled first — after
    `confirm(question)` says yes, or with `assume_yes`."""
    if Path(text).exists():
        return text, None
    name = parse(text)
    if name is None:
        return text, None  # the runtime says it does not exist
    stored = lookup(name)
    if stored:
        entry = _best_stored(stored, n_ctx, machine, cache_ram)
    else:
        if not assume_yes and not (confirm and confirm(f"{name} is not in the model store ({models_dir()}); "
                                                       "download and convert it now?")):
            raise ModelError(f"{name} is not in the model store: run `qwen35 pull {name}` first, or pass --yes to "
                             "pull it now")
        entry = pull(name, n_ctx=n_ctx, machine=machine, prefer_cache=True, cache_ram=cache_ram)
    return str(entry.model), entry.mmproj


def _best_stored(stored: list[StoredModel], n_ctx: int, machine: Machine | None, cache_ram: int | None) -> StoredModel:
    """Of several stored profiles (best quality first), the best that fits now; else the smallest,
    which the runtime's own check then judges."""
    if len(stored) == 1:
        return stored[0]
    from ..runtime.engine.errors import ChatError
    from ..runtime.engine.modelfile import read_model_file
    from .fit import needed

    machine = machine or Machine.this()
    for entry in stored:
        try:
            mmproj = read_model_file(entry.mmproj) if entry.mmproj else None
            if needed(read_model_file(entry.model), mmproj, n_ctx, machine, cache_ram) <= machine.available:
                return entry
        except (ChatError, OSError):  # a damaged entry: let the runtime say what is wrong with it if it is chosen
            continue
    return stored[-1]
