"""The mmproj file: key for key and tensor for tensor what llama.cpp's reference converter writes with
--mmproj, at every --mmproj-type; and the converter's guarantees (errors, dry run, info) for it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen35.cli import main
from qwen35.convert.pipeline import Conversion
from qwen35.demo.synthetic import write_checkpoint
from tests.tiny import byte_level_tokenizer, gguf_contents, tiny_config

# The llama.cpp source that llama-cpp-python 0.3.36 vendors, as bench/bench_convert.py unpacks it
# (or QWEN35_LLAMA_CPP: a directory holding convert_hf_to_gguf.py). Never downloaded by a test.
BENCH_SDIST = Path("/tmp/qwen35-bench/llama_cpp_python-0.3.36/vendor/llama.cpp")
MMPROJ_TYPES = ["f32", "f16", "bf16", "q8_0"]


def vision_config() -> dict:
    config = tiny_config()
    # Two blocks; an FFN width (48) that is not a multiple of Q8_0's block, so ffn_down falls back to F16.
    config["vision_config"].update(depth=2, hidden_size=64, intermediate_size=48, num_heads=4,
                                   num_position_embeddings=16, deepstack_visual_indexes=[])
    return config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("vl") / "tiny-vl", vision_config(), seed=3)
    byte_level_tokenizer(path)
    return path


def reference_converter() -> Path:
    source = Path(os.environ.get("QWEN35_LLAMA_CPP", BENCH_SDIST)) / "convert_hf_to_gguf.py"
    if not source.is_file():
        pytest.skip(f"no reference converter at {source} (run bench/bench_convert.py once, or set QWEN35_LLAMA_CPP)")
    return source


def reference_mmproj(ckpt: Path, type_name: str, out: Path) -> Path:
    script = reference_converter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, script, ckpt, "--mmproj", "--outtype", type_name, "--outfile", out],
                            capture_output=True, text=True, env=env, cwd=script.parent)
    if result.returncode != 0 and "ModuleNotFoundError" in result.stderr:
        pytest.skip("the reference converter cannot run here: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def key_types(path: Path) -> dict:
    """{key: [GGUF value type codes]} as gguf-py reads them: a value of the right type is half of a key."""
    from gguf import GGUFReader

    return {k: list(f.types) for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


# general.* is naming that tools fill as they like, except these, which loaders read.
LOADER_GENERAL = ("general.architecture", "general.type", "general.file_type", "general.quantization_version")


@pytest.mark.parametrize("type_name", MMPROJ_TYPES)
def test_mmproj_equals_the_reference_converters(ckpt, tmp_path, type_name):
    theirs_path = reference_mmproj(ckpt, type_name, tmp_path / "reference-mmproj.gguf")
    outputs = Conversion(ckpt, ["bf16"], tmp_path / "ours/", mmproj=type_name).run()
    ours_path = outputs[-1].path
    assert ours_path.name == f"tiny-vl-mmproj-{type_name.upper()}.gguf"

    our_meta, ours = gguf_contents(ours_path)
    their_meta, theirs = gguf_contents(theirs_path)

    def loader_keys(meta):
        return {k: v for k, v in meta.items() if not k.startswith("general.") or k in LOADER_GENERAL}

    assert loader_keys(our_meta) == loader_keys(their_meta)
    our_types, their_types = key_types(ours_path), key_types(theirs_path)
    assert {k: our_types[k] for k in loader_keys(our_meta)} == {k: their_types[k] for k in loader_keys(their_meta)}
    assert {n: (s, t) for n, (s, t, _) in ours.items()} == {n: (s, t) for n, (s, t, _) in theirs.items()}
    differing = [n for n in ours if ours[n][2] != theirs[n][2]]
    assert not differing, f"{len(differing)} tensors differ in bytes, e.g. {differing[:3]}"


def test_mmproj_types_and_fallbacks(ckpt, tmp_path):
    """Without the reference: the dtype rules on this checkpoint, as VISION.md §1 lists them."""
    out = Conversion(ckpt, ["bf16"], tmp_path / "ours/", mmproj="q8_0").run()[-1].path
    meta, tensors = gguf_contents(out)
    types = {n: t.name for n, (_, t, _) in tensors.items()}
    assert types["v.patch_embd.weight"] == types["v.patch_embd.weight.1"] == "F32"
    assert types["v.position_embd.weight"] == "F32"
    assert types["v.blk.0.ffn_down.weight"] == "F16"  # row of 48
    assert types["v.blk.0.attn_qkv.weight"] == types["mm.0.weight"] == "Q8_0"
    assert all(types[n] == "F32" for n, (s, _, _) in tensors.items() if len(s) == 1)
    assert tensors["v.patch_embd.weight"][0] == (64, 3, 16, 16)
    assert meta["general.type"] == "mmproj" and meta["clip.projector_type"] == "qwen3vl_merger"
    assert meta["clip.vision.image_size"] == 64 and meta["clip.vision.projection_dim"] == 64


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_missing_preprocessor_config_is_one_line(ckpt, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "preprocessor_config.json").unlink()
    result = run("convert", bare, "-q", "f32", "-o", tmp_path / "out.gguf")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "preprocessor_config.json" in result.output
    assert "--no-mmproj" in result.output
    assert not list(tmp_path.glob("*.gguf*"))
    assert run("convert", bare, "-q", "f32", "-o", tmp_path / "out.gguf", "--no-mmproj").exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["out.gguf"]


def test_dry_run_lists_the_mmproj_and_info_describes_it(ckpt, tmp_path):
    result = run("convert", ckpt, "-q", "f32", "-o", tmp_path / "m.gguf", "--dry-run", "--mmproj-type", "bf16")
    assert result.exit_code == 0, result.output
    assert "tiny-vl-mmproj-BF16.gguf" in result.output and "v.patch_embd.weight.1" in result.output
    assert not list(tmp_path.iterdir())
    assert run("convert", ckpt, "-q", "f32", "-o", tmp_path / "m.gguf").exit_code == 0
    info = run("info", tmp_path / "tiny-vl-mmproj-F16.gguf")
    assert info.exit_code == 0, info.output
    assert "qwen3vl_merger" in info.output and "2 blocks" in info.output and "output width" in info.output


def test_an_existing_mmproj_is_kept_without_force(ckpt, tmp_path):
    assert run("convert", ckpt, "-q", "f32", "-o", tmp_path / "m.gguf").exit_code == 0
    again = run("convert", ckpt, "-q", "f32", "-o", tmp_path / "other.gguf")
    assert again.exit_code == 1 and "tiny-vl-mmproj-F16.gguf already exists" in again.output
    assert not (tmp_path / "other.gguf").exists()
