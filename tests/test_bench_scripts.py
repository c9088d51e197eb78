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


def test_the_amx_withholding_wrapper_loads_the_engine_cpu_module_on_its_own():
    """The Python peers run under bench/without_amx.py, which loads runtime/engine/cpu.py by its path in
    a venv without qwen35; once cpu.py imported a module beside it, every peer start died at that
    import and the agent-loop bench could not run (found on 2026-12-07)."""
    script = ("import runpy, sys\n"
              "sys.argv = ['without_amx.py', '-c']\n"
              "import without_amx\n"
              "without_amx.withhold_amx()\n"
              "assert 'qwen35' not in sys.modules\n"  # (it needs nothing of the package)
              "print('withheld')\n")
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r})\n" + script],
                          cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "withheld", done.stderr[-2000:]
