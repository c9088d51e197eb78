"""The per-tensor plan for every real release, from its config alone, against a committed snapshot.

A change in what qwen35 writes for a real model (a name, a shape, a type) shows up as a diff of
tests/snapshots/. After an intended change: QWEN35_UPDATE_SNAPSHOTS=1 pytest tests/test_plan_snapshots.py
"""

import json
import os
from pathlib import Path

import pytest

from qwen35.convert import profiles, qwen35
from qwen35.convert.checkpoint import TensorInfo
from qwen35.gguf_header import tensor_nbytes
from qwen35.convert.synthetic import checkpoint_layout
from tests.tiny import RELEASE_CONFIGS

SNAPSHOTS = Path(__file__).parent / "snapshots"
RELEASES = ["qwen3.5-0.8b.config.RECONSTRUCTED", "qwen3.5-2b.config.RECONSTRUCTED", "qwen3.5-4b.config.RECONSTRUCTED",
            "qwen3.5-9b.config", "qwen3.5-27b.config", "qwen3.5-35b-a3b.config", "qwen3.5-122b-a10b.config",
            "qwen3.5-397b-a17b.config"]
PROFILES = ["q4_k_m", "q4_k_m-hybrid"]


class HeaderOnlyCheckpoint:
    """The safetensors headers a release would have: names, dtypes, shapes; no data."""

    def __init__(self, config: dict):
        self.tensors = {name: TensorInfo(name, dtype, shape, Path("/nonexistent"), 0, 0)
                        for name, dtype, shape in checkpoint_layout(config, experts="fused", mtp_experts="per_expert")}

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name):
        return self.tensors[name]


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
