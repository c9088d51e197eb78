"""Converted GGUFs run in llama.cpp give transformers' logits on tiny release-layout checkpoints.

Each fixture (see tests/fixtures.py) is converted with `qwen35.convert.convert`, evaluated by
llama.cpp (loaded through the runtime, tests/llama.py) on a fixed prompt, and compared position by position with
transformers' float32 logits computed from the same BF16 weights.
"""

import numpy as np
import pytest

from tests.fixtures import FIXTURES

pytest.importorskip("llama_cpp")

from tests.llama import llama_logits  # noqa: E402

# An F32 conversion is exact up to float32 summation order: with an F32 KV cache llama.cpp's
# reference converter measures 2e-12 to 2e-11 on these fixtures. Rounding one tensor kind to
# BF16 by mistake costs more than this bound; a converter bug (a missing +1, unreordered V heads)
# costs 1e-3 to 1.
F32_MAX_KL = 1e-8
# Per-type bounds on dense_untied_kv_ne, about 10x what the reference converter measures
# (F16 2.4e-6, BF16 9.6e-5, Q8_0 4.9e-3). The weights are BF16 already, so BF16 and F16 files
# lose nothing: their KL is ggml rounding the activations to the weight type in each matmul.
MAX_KL = {"f32": F32_MAX_KL, "f16": 3e-5, "bf16": 1e-3, "q8_0": 5e-2}


def kl_and_top1(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Mean KL(p_reference || p_candidate) over positions, and the fraction of equal argmaxes."""
    def log_softmax(logits):
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    top1 = (reference.argmax(axis=-1) == candidate.argmax(axis=-1)).mean()
    return float(kl.mean()), float(top1)


@pytest.fixture(scope="session")
def convert_to(tmp_path_factory):
    """convert_to(fixture, qtype) -> GGUF path, converting each (fixture, qtype) once per session."""
    from qwen35.convert import convert

    out_dir = tmp_path_factory.mktemp("parity_gguf")
    converted = {}

    def convert_once(fixture, qtype):
        key = (fixture.spec.name, qtype)
        if key not in converted:
            output = out_dir / f"{fixture.spec.name}.{qtype}.gguf"
            (result,) = convert(fixture.checkpoint, qtypes=[qtype], output=output, mmproj=None)
            converted[key] = result.path
        return converted[key]

    return convert_once


@pytest.mark.parametrize("name", list(FIXTURES))
def test_f32_matches_transformers(name, qwen35_fixture, convert_to):
    fixture = qwen35_fixture(name)
    logits = llama_logits(convert_to(fixture, "f32"), fixture.prompt_ids)
    assert logits.shape == fixture.reference_logits.shape
    kl, top1 = kl_and_top1(fixture.reference_logits, logits)
    assert kl < F32_MAX_KL
    assert top1 == 1.0


def test_lower_precision_types_are_close_and_ordered(qwen35_fixture, convert_to):
    fixture = qwen35_fixture("dense_untied_kv_ne")
    kl = {
        qtype: kl_and_top1(fixture.reference_logits, llama_logits(convert_to(fixture, qtype), fixture.prompt_ids))[0]
        for qtype in MAX_KL
    }
    assert all(kl[qtype] < bound for qtype, bound in MAX_KL.items()), kl
    # Mantissa bits decide the order: F32 23, F16 10, BF16 7, Q8_0 ~7 plus per-block scaling
    # and activations quantized to 8 bits. Each step costs well over 10x in KL here.
    assert kl["f32"] < kl["f16"] < kl["bf16"] < kl["q8_0"], kl
