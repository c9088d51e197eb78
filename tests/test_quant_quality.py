"""Quantized outputs load, run, and lose accuracy in the order their bits say.

KL divergence is measured against the F32 conversion of the same checkpoint (llama.cpp both sides);
per-tensor error is the dequantized tensor against the F32 one.
"""

import numpy as np
import pytest
from gguf import quants

from qwen35.convert.pipeline import Conversion
from qwen35.demo.synthetic import write_checkpoint
from tests.tiny import byte_level_tokenizer, gguf_contents, tiny_config

pytest.importorskip("llama_cpp")

from qwen35.runtime import ChatSession  # noqa: E402
from tests.llama import llama_logits  # noqa: E402

ORDERED = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]
# Relative RMS error a type keeps to on normally distributed weights: roughly halving per extra bit
# (measured here at about 2/3 of these bounds).
PROMISED_ERROR = {"Q8_0": 0.008, "Q6_K": 0.025, "Q5_K": 0.05, "Q5_0": 0.06, "Q5_1": 0.06, "Q4_K": 0.10,
                  "Q4_0": 0.12, "IQ4_NL": 0.10, "IQ4_XS": 0.10, "Q3_K": 0.21, "IQ3_S": 0.22,
                  "Q2_K": 0.40}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    # Rows of 256 so the K-quants apply rather than fall back.
    config = tiny_config(hidden_size=256, intermediate_size=512, head_dim=64, linear_key_head_dim=64,
                         linear_value_head_dim=64, vocab_size=512)
    ckpt = write_checkpoint(work / "ckpt", config, seed=1)
    byte_level_tokenizer(ckpt)
    types = ["f32", *ORDERED, "q5_k_s", "q5_0", "q4_k_s", "q4_0", "iq4_nl", "iq4_xs", "iq3_s", "edge-arm", "q4_k_m-hybrid"]
    outputs = Conversion(ckpt, types, work / "out", mmproj=None).run(threads=2)  # one read, every file
    return {o.type_name: o.path for o in outputs}


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logits(path, tokens):
    return log_softmax(llama_logits(path, tokens).astype(np.float64))


def test_kl_against_f32_grows_as_bits_shrink(converted):
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 280, 64)]
    p = logits(converted["f32"], tokens)
    kl = {}
    for name in ORDERED:
        q = logits(converted[name], tokens)
        kl[name] = float((np.exp(p) * (p - q)).sum(-1).mean())
    assert list(kl.values()) == sorted(kl.values()), kl
    assert kl["q8_0"] < 1e-4 and kl["q2_k"] < 0.1, kl


def test_every_quantized_tensor_keeps_the_error_its_type_promises(converted):
    _, f32 = gguf_contents(converted["f32"])
    reference = {name: np.frombuffer(raw, np.float32).reshape(-1, shape[-1]) for name, (shape, _, raw) in f32.items()}
    checked = set()
    for name, path in converted.items():
        for tensor, (_, ggml_type, raw) in gguf_contents(path)[1].items():
            if ggml_type.name in ("F32", "F16", "BF16"):
                continue
            x = reference[tensor]
            y = quants.dequantize(np.frombuffer(raw, np.uint8).reshape(x.shape[0], -1), ggml_type).reshape(x.shape)
            error = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
            assert error < PROMISED_ERROR[ggml_type.name], (name, tensor, ggml_type.name, error)
            checked.add(ggml_type.name)
    assert checked == set(PROMISED_ERROR)


def test_every_output_loads_and_generates(converted):
    for name, path in converted.items():
        with ChatSession(path, n_ctx=256, threads=2, prefill=False, think=False) as chat:
            reply = chat.send("hi", max_tokens=4, temp=0)
        assert reply.stats["gen_tokens"] >= 1, name
