"""The one GGUF header reader (gguf_header.py): what it reads back, against our writer and gguf-py's reader."""

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qwen35.convert.gguf_file import GGUFFile
from qwen35.gguf_header import KEEP_ARRAYS_UP_TO, ArrayInfo, GGUFFormatError, TensorSpec, read_header

METADATA = [
    ("general.architecture", "string", "qwen35"),
    ("qwen35.block_count", "u32", 7),
    ("qwen35.rope.dimension_sections", "i32[]", [11, 11, 10, 0]),
    ("qwen35.attention.layer_norm_rms_epsilon", "f32", 0.5),
    ("qwen35.attention.recurrent_layers", "bool[]", [True, False]),
    ("tokenizer.ggml.tokens", "string[]", [f"t{i}" for i in range(KEEP_ARRAYS_UP_TO + 1)]),
    ("tokenizer.ggml.token_type", "i32[]", [1] * (KEEP_ARRAYS_UP_TO + 1)),
    ("short.strings", "string[]", ["a", "bé"]),
]
TENSORS = [TensorSpec("a", (3, 5), T.F32), TensorSpec("b", (2, 32), T.Q8_0), TensorSpec("c", (7,), T.F16)]


def write_small(path):
    f = GGUFFile(path, METADATA, TENSORS).open()
    f.write(np.arange(15, dtype=np.float32))
    f.write(np.zeros(2 * 34, dtype=np.uint8))
    f.write(np.ones(7, dtype=np.float16))
    return f.finish()


def test_reads_back_what_the_writer_wrote(tmp_path):
    header = read_header(write_small(tmp_path / "x.gguf"))
    meta = header.metadata
    assert meta["general.architecture"] == "qwen35"
    assert meta["qwen35.block_count"] == 7
    assert meta["qwen35.rope.dimension_sections"] == [11, 11, 10, 0]
    assert meta["qwen35.attention.layer_norm_rms_epsilon"] == 0.5
    assert meta["qwen35.attention.recurrent_layers"] == [True, False]
    assert meta["short.strings"] == ["a", "bé"]
    # Long arrays are summarised: item type (STRING = 8, INT32 = 5) and length.
    assert meta["tokenizer.ggml.tokens"] == ArrayInfo(8, KEEP_ARRAYS_UP_TO + 1)
    assert meta["tokenizer.ggml.token_type"] == ArrayInfo(5, KEEP_ARRAYS_UP_TO + 1)
    assert header.array_length("tokenizer.ggml.tokens") == KEEP_ARRAYS_UP_TO + 1
    assert header.array_length("short.strings") == 2 and header.array_length("absent") == 0
    assert [(t.name, t.shape, t.ggml_type, t.nbytes) for t in header.tensors] == [
        ("a", (3, 5), T.F32, 60), ("b", (2, 32), T.Q8_0, 68), ("c", (7,), T.F16, 14)]
    data = header.path.read_bytes()
    a = header.tensors[0]
    assert np.frombuffer(data[a.offset:a.offset + a.nbytes], np.float32).tolist() == list(range(15))
    assert header.file_size == len(data)


def test_agrees_with_gguf_py(tmp_path):
    """Offsets, shapes and short values as gguf-py's GGUFReader sees the same file."""
    from gguf import GGUFReader

    path = write_small(tmp_path / "x.gguf")
    ours, theirs = read_header(path), GGUFReader(path)
    assert [(t.name, t.offset, t.shape) for t in ours.tensors] == [
        (t.name, int(t.data_offset), tuple(int(d) for d in reversed(t.shape))) for t in theirs.tensors]
    for key in ("qwen35.block_count", "qwen35.rope.dimension_sections", "short.strings"):
        assert ours.metadata[key] == theirs.fields[key].contents()


@pytest.mark.parametrize("cut, message", [(100, "its header ends early"), (-20, "but its tensors need")])
def test_truncated(tmp_path, cut, message):
    data = write_small(tmp_path / "x.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(GGUFFormatError, match=f"cut.gguf is truncated: .*{message}"):
        read_header(tmp_path / "cut.gguf")


def test_not_gguf_missing_and_other_versions(tmp_path):
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(GGUFFormatError, match="text.gguf is not a GGUF file"):
        read_header(tmp_path / "text.gguf")
    with pytest.raises(GGUFFormatError, match="nope.gguf does not exist"):
        read_header(tmp_path / "nope.gguf")
    with pytest.raises(GGUFFormatError, match="is not a file"):
        read_header(tmp_path)
    (tmp_path / "v1.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(GGUFFormatError, match="GGUF version 1; llama.cpp reads versions 2 and 3"):
        read_header(tmp_path / "v1.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"GGUF")
    with pytest.raises(GGUFFormatError, match="its header ends early"):
        read_header(tmp_path / "empty.gguf")
