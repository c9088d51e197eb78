"""The per-tensor plan for every real release, from its config alone, against a committed snapshot.

A change in what qwen35 writes for a real model (a name, a shape, a type) shows up as a diff of
tests/snapshots/. After an intended change: QWEN35_UPDATE_SNAPSHOTS=1 pytest tests/test_plan_snapshots.py
(CI refuses that variable: tests/conftest.py).

A snapshot only says that nothing changed; what says the plan is right stands beside it, and does
not pass by rewriting a file:
- q4_k_m: tests/test_llama_quantize_match.py::test_release_plan_matches_llama_quantize gives
  llama-quantize (llama.cpp's own choice, dry run) the header of real releases and compares every
  tensor's name and type with our plan;
- q4_k_m-hybrid: test_hybrid_plan_is_q4_k_m_with_the_recurrent_projections_at_q8_0 below derives
  it from the q4_k_m plan and the profile's rule as the README states it, with the layer kinds read
  from the release's config.
"""

import json
import os
import re
from pathlib import Path

import pytest

from qwen35.convert import profiles, qwen35
from qwen35.gguf_header import tensor_nbytes
from qwen35.models.fit import HeaderOnlyCheckpoint  # the headers a release has, from its config
from tests.tiny import RELEASE_CONFIGS

SNAPSHOTS = Path(__file__).parent / "snapshots"
RELEASES = ["qwen3.5-0.8b.config.RECONSTRUCTED", "qwen3.5-2b.config.RECONSTRUCTED", "qwen3.5-4b.config.RECONSTRUCTED",
            "qwen3.5-9b.config", "qwen3.5-27b.config", "qwen3.5-35b-a3b.config", "qwen3.5-122b-a10b.config",
            "qwen3.5-397b-a17b.config"]
PROFILES = ["q4_k_m", "q4_k_m-hybrid"]


def plan_text(release: str, profile_name: str) -> str:
    config = json.loads((RELEASE_CONFIGS / f"{release}.json").read_text())
    h = qwen35.read_hparams({**config, **config.get("text_config", {})})
    tensors = qwen35.plan_tensors(HeaderOnlyCheckpoint(config), h, mtp=True)
    facts = qwen35.model_facts(h, tensors)
    profile = profiles.load(profile_name)
    lines, total = [], 0
    for t in tensors:
        ggml_type = profile.choose(t, facts).type
        nbytes = tensor_nbytes(t.shape, ggml_type)
        total += nbytes
        lines.append(f"{t.name:<42} {'x'.join(map(str, t.shape)):>20} {ggml_type.name}")
    head = f"# {release} as {profile_name}: {len(tensors)} tensors, {total:,} bytes of tensor data ({qwen35.size_label(tensors, h)})"
    return "\n".join([head] + lines) + "\n"


@pytest.mark.parametrize("profile_name", PROFILES)
@pytest.mark.parametrize("release", RELEASES)
def test_plan_matches_snapshot(release, profile_name):
    text = plan_text(release, profile_name)
    path = SNAPSHOTS / f"{release.split('.config')[0]}.{profile_name}.txt"
    if os.environ.get("QWEN35_UPDATE_SNAPSHOTS"):
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"no snapshot {path.name}: run with QWEN35_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text()


_RECURRENT = re.compile(r"blk\.(\d+)\.(attn_qkv|attn_gate|ssm_out)\.weight")


def _plan(text: str) -> dict[str, tuple[str, str]]:
    """{tensor: (shape, type)} of a plan_text."""
    rows = [line.split() for line in text.splitlines()[1:]]
    return {name: (shape, ggml_type) for name, shape, ggml_type in rows}


@pytest.mark.parametrize("release", RELEASES)
def test_hybrid_plan_is_q4_k_m_with_the_recurrent_projections_at_q8_0(release):
    """The README's q4_k_m-hybrid: "Q4_K_M with the Gated DeltaNet projections (attn_qkv, attn_gate,
    ssm_out of linear-attention layers) and the MTP projection at Q8_0" — every other tensor as
    q4_k_m (which test_release_plan_matches_llama_quantize checks against llama-quantize)."""
    config = json.loads((RELEASE_CONFIGS / f"{release}.json").read_text())
    text = {**config, **config.get("text_config", {})}
    linear = {i for i, kind in enumerate(text["layer_types"]) if kind == "linear_attention"}
    base, hybrid = _plan(plan_text(release, "q4_k_m")), _plan(plan_text(release, "q4_k_m-hybrid"))
    assert hybrid.keys() == base.keys()
    raised = set()
    for name, (shape, ggml_type) in hybrid.items():
        recurrent = _RECURRENT.fullmatch(name)
        if (recurrent and int(recurrent.group(1)) in linear) or name.endswith(".nextn.eh_proj.weight"):
            assert ggml_type == "Q8_0", name
            raised.add(name)
        else:
            assert (shape, ggml_type) == base[name], name
    # Every linear-attention layer has its three, and the MTP head its projection.
    assert len(raised) == 3 * len(linear) + text.get("mtp_num_hidden_layers", 0), sorted(raised)
