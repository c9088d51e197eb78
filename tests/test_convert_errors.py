"""Bad input ends in one clear line and exit status 1, never a traceback, never a partial file."""

import errno
import json
import shutil
import struct

import pytest
from click.testing import CliRunner

from qwen35.cli import main
from qwen35.convert import gguf_file
from qwen35.demo.synthetic import write_checkpoint

from tests.tiny import byte_level_tokenizer, tiny_config


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("pristine") / "ckpt", tiny_config(), vision=True)
    byte_level_tokenizer(ckpt)
    return ckpt


@pytest.fixture
def ckpt(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "ckpt")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def no_outputs_left(directory):
    return not [p for p in directory.iterdir() if p.suffix in (".gguf", ".partial") or p.name.endswith(".partial")]


def test_converts_the_tiny_checkpoint(ckpt, tmp_path):
    result = run("convert", ckpt, "-q", "f32", "-o", tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.gguf").stat().st_size > 0
    assert "wrote" in result.output


def test_missing_directory(tmp_path):
    assert_one_line_error(run("convert", tmp_path / "nope"), "does not exist")


def test_a_file_given_as_the_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert_one_line_error(run("convert", tmp_path / "model.safetensors"), "is not a directory")


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    assert_one_line_error(run("convert", ckpt, "-o", tmp_path / "o.gguf"), "config.json not found")


def test_unsupported_architecture_names_the_supported_ones(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("convert", ckpt, "-o", tmp_path / "o.gguf"), "LlamaForCausalLM", "Qwen3_5ForConditionalGeneration")


def test_missing_shard(ckpt, tmp_path):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model.safetensors-00002-of-00002.safetensors"}}))
    assert_one_line_error(run("convert", ckpt, "-o", tmp_path / "o.gguf"), "model.safetensors-00002-of-00002.safetensors", "missing")


def test_missing_tokenizer(ckpt, tmp_path):
    (ckpt / "tokenizer.json").unlink()
    assert_one_line_error(run("convert", ckpt, "-o", tmp_path / "o.gguf"), "no tokenizer")
    assert no_outputs_left(tmp_path)


def test_truncated_safetensors(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(run("convert", ckpt, "-o", tmp_path / "o.gguf"), "truncated")


def test_corrupt_safetensors_header(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at "
    path.write_bytes(bytes(data))
    assert_one_line_error(run("convert", ckpt, "-o", tmp_path / "o.gguf"), "corrupt header")


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    # Keep the data offsets valid: the new header may differ in length, the data does not move.
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_shape_that_disagrees_with_the_config(ckpt, tmp_path):
    name = "model.language_model.layers.0.linear_attn.in_proj_b.weight"

    def swap(header):
        rows, cols = header[name]["shape"]
        header[name]["shape"] = [cols, rows]

    _rewrite_header(ckpt / "model.safetensors", swap)
    assert_one_line_error(run("convert", ckpt, "-o", tmp_path / "o.gguf"), name, "config.json implies")


def test_unsupported_dtype(ckpt, tmp_path):
    name = "model.language_model.norm.weight"

    def to_i16(header):
        header[name]["dtype"] = "I16"

    _rewrite_header(ckpt / "model.safetensors", to_i16)
    assert_one_line_error(run("convert", ckpt, "-o", tmp_path / "o.gguf"), "I16")


def test_unknown_output_type_lists_the_valid_ones(ckpt, tmp_path):
    assert_one_line_error(run("convert", ckpt, "-q", "q9_9", "-o", tmp_path / "o.gguf"), "q9_9", "bf16")


def test_existing_output_is_kept_without_force(ckpt, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    assert_one_line_error(run("convert", ckpt, "-q", "f32", "-o", out), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert run("convert", ckpt, "-q", "f32", "-o", out, "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_not_enough_space_is_caught_before_writing(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 0))
    assert_one_line_error(run("convert", ckpt, "-o", tmp_path / "o.gguf"), "not enough space")
    assert no_outputs_left(tmp_path)


def test_disk_full_while_writing_leaves_no_partial_file(ckpt, tmp_path, monkeypatch):
    calls = []
    real_write = gguf_file.GGUFFile.write

    def write_then_fail(self, data):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(gguf_file.GGUFFile, "write", write_then_fail)
    assert_one_line_error(run("convert", ckpt, "-q", "f32", "-q", "bf16", "-o", tmp_path), "no space left")
    assert no_outputs_left(tmp_path)


def test_several_types_need_a_directory(ckpt, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run("convert", ckpt, "-q", "f32", "-q", "bf16", "-o", tmp_path / "file"), "directory")


def test_info_on_a_missing_file(tmp_path):
    assert_one_line_error(run("info", tmp_path / "x.gguf"), "does not exist")


def test_info_on_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_text("hello")
    assert_one_line_error(run("info", tmp_path / "x.gguf"), "not a GGUF file")


def test_info_on_a_truncated_gguf(ckpt, tmp_path):
    out = tmp_path / "o.gguf"
    assert run("convert", ckpt, "-q", "f32", "-o", out).exit_code == 0
    out.write_bytes(out.read_bytes()[:5000])
    assert_one_line_error(run("info", out), "is truncated")
