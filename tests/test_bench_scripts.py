"""Every script in bench/ starts: its imports (of the package and of the other bench scripts) resolve
and its options parse (`--help`). The benches are run by hand, not in CI, so a rename elsewhere would
otherwise break one silently until the next person measures (bench_mtp.py imported a name
bench_server.py no longer had)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# Helpers the benches import or run, not benches with options of their own.
NOT_SCRIPTS = {"without_amx.py"}
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in NOT_SCRIPTS)


def test_the_bench_folder_holds_scripts():
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bench_script_starts_and_explains_its_options(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=BENCH, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout, done.stdout[:500]
