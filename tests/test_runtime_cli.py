"""`qwen35 run` as a user meets it: a chat on a pseudo-terminal, one-shot answers and errors (no network: tests/test_offline.py)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.test_runtime import tiny_gguf  # noqa: F401  (the fixture)

QWEN35 = [sys.executable, "-m", "qwen35.cli"]


def run_cli(*args, input=None, timeout=120):
    return subprocess.run([*QWEN35, *map(str, args)], input=input, capture_output=True, text=True, timeout=timeout)


class Terminal:
    """`qwen35 run` on a pseudo-terminal: what a user types, and what they see."""

    def __init__(self, *args) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: stdin/stdout/stderr are the terminal
            os.execv(sys.executable, [*QWEN35, *map(str, args)])
        self.seen = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Read until `text` appears; returns everything read up to and including it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"did not see {text!r}; the terminal shows:\n{self.seen[-2000:]}")
            if select.select([self.fd], [], [], remaining)[0]:
                try:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    raise AssertionError(f"exited before {text!r}:\n{self.seen[-2000:]}") from None
        end = self.seen.index(text) + len(text)
        shown, self.seen = self.seen[:end], self.seen[end:]
        return shown

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("qwen35 run did not exit")


def test_repl_streams_runs_commands_and_exits_on_ctrl_d(tiny_gguf, tmp_path):  # noqa: F811
    term = Terminal("run", tiny_gguf, "--seed", "1", "--max-tokens", "6", "--ctx-size", "1024")
    term.expect(">>> ")
    term.send("/help\n")
    assert "/think on|off" in term.expect(">>> ")
    term.send("hello\n")
    shown = term.expect(">>> ")
    assert "\033[2m" in shown  # the reasoning, dimmed
    assert "[reached --max-tokens]" in shown
    term.send("/stats\n")
    assert "tokens evaluated" in term.expect(">>> ")
    term.send("/think off\n")
    assert "thinking is off" in term.expect(">>> ")
    term.send('"""first line\nsecond line"""\n')  # a multi-line message
    term.expect(">>> ")
    term.send(f"/save {tmp_path / 'chat.qwen35'}\n")
    assert "saved 4 messages" in term.expect(">>> ")
    term.send("/reset\n")
    assert "conversation reset" in term.expect(">>> ")
    term.send(f"/load {tmp_path / 'chat.qwen35'}\n")
    assert "loaded 4 messages" in term.expect(">>> ")
    term.send(f"/load {tmp_path / 'missing'}\n")
    assert "error:" in term.expect(">>> ")
    term.send("/system Be brief.\n")
    assert "system prompt set" in term.expect(">>> ")
    term.send("/nonsense\n")
    assert "unknown command" in term.expect(">>> ")
    term.send("\x04")  # Ctrl-D
    assert term.wait() == 0


def test_ctrl_c_stops_the_reply_not_the_chat(tiny_gguf):  # noqa: F811
    term = Terminal("run", tiny_gguf, "--seed", "1", "--max-tokens", "3000", "--ctx-size", "4096")
    term.expect(">>> ")
    term.send("tell me a long story\n")
    term.expect("\033[2m", timeout=60)  # reasoning is streaming
    term.send("\x03")  # Ctrl-C
    assert "[stopped]" in term.expect(">>> ", timeout=60)
    term.send("/stats\n")
    assert "(interrupted)" in term.expect(">>> ")
    term.send("/exit\n")
    assert term.wait() == 0


def test_one_shot_prints_the_answer_on_stdout(tiny_gguf):  # noqa: F811
    result = run_cli("run", tiny_gguf, "-p", "Hello", "--no-think", "--max-tokens", "5", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    piped = run_cli("run", tiny_gguf, "--max-tokens", "5", "--seed", "3", "--no-think", input="Hello")
    assert piped.returncode == 0 and piped.stdout == result.stdout


def test_one_shot_reasoning_goes_to_stderr_or_nowhere(tiny_gguf):  # noqa: F811
    shown = run_cli("run", tiny_gguf, "-p", "Hello", "--think", "--max-tokens", "5", "--seed", "3")
    hidden = run_cli("run", tiny_gguf, "-p", "Hello", "--think", "--max-tokens", "5", "--seed", "3", "--hide-thinking")
    assert shown.returncode == hidden.returncode == 0
    assert shown.stderr.strip() and not hidden.stderr.strip()
    assert shown.stdout == hidden.stdout


def test_json_keeps_reasoning_and_content_apart(tiny_gguf):  # noqa: F811
    result = run_cli("run", tiny_gguf, "-p", "Hello", "--json", "--think", "--max-tokens", "6", "--seed", "3")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {"reasoning", "content", "finish_reason", "stats"}
    assert out["reasoning"] and "<think>" not in out["content"] and "</think>" not in out["content"]
    assert out["stats"]["prompt_tokens"] > 0 and out["stats"]["gen_tokens"] == 6


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.gguf", "does not exist"),
    (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", "is not a GGUF file"),
])
def test_bad_model_files_are_one_line_errors(tmp_path, make, message):
    result = run_cli("run", make(tmp_path), "-p", "hi")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # no traceback


def test_truncated_model_is_a_one_line_error(tiny_gguf, tmp_path):  # noqa: F811
    (tmp_path / "cut.gguf").write_bytes(tiny_gguf.read_bytes()[:1_000_000])
    result = run_cli("run", tmp_path / "cut.gguf", "-p", "hi")
    assert result.returncode == 1 and "is truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_prompt_larger_than_the_context(tiny_gguf):  # noqa: F811
    result = run_cli("run", tiny_gguf, "-p", "word " * 400, "--ctx-size", "256")
    assert result.returncode == 3
    assert "no longer fits" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_json_needs_a_prompt(tiny_gguf):  # noqa: F811
    term = Terminal("run", tiny_gguf, "--json")
    term.expect("error: --json answers one prompt", timeout=60)
    assert term.wait() == 1


# (No network: tests/test_offline.py runs `run`, `serve`, `convert` and `demo` without one.)


def test_bench_prints_a_table(tiny_gguf):  # noqa: F811
    result = run_cli("bench", tiny_gguf, "-p", "32", "-n", "8", "-r", "1")
    assert result.returncode == 0, result.stderr
    assert "| pp32 |" in result.stdout and "| tg8 |" in result.stdout and "peak memory" in result.stdout
    data = json.loads(run_cli("bench", tiny_gguf, "-p", "32", "-n", "8", "-r", "1", "--json").stdout)
    run, = data["runs"]
    assert run["pp"]["tps"] > 0 and run["tg"]["tps"] > 0 and data["peak_rss_bytes"] > 0


def test_bench_generates_exactly_the_asked_tokens_as_llama_bench_does(tiny_gguf):  # noqa: F811
    """Greedy, the random model repeats itself within ~20 tokens (a chat reply would end there, as it
    would at an end-of-turn token); the bench's reply runs to -n all the same."""
    from qwen35.runtime import ChatSession

    with ChatSession(tiny_gguf, n_ctx=512, threads=2, prefill=False, think=False) as chat:
        assert chat.send("Hi", max_tokens=96, temp=0).stats["gen_tokens"] < 96
    data = json.loads(run_cli("bench", tiny_gguf, "-p", "16", "-n", "96", "-r", "1", "--no-mtp", "--json").stdout)
    assert data["runs"][0]["tg"]["n"] == 96


def test_bench_sweeps_threads_and_names_the_fastest(tiny_gguf):  # noqa: F811
    data = json.loads(run_cli("bench", tiny_gguf, "-p", "16", "-n", "4", "-r", "1", "-t", "1,2", "--json").stdout)
    assert [r["threads"] for r in data["runs"]] == [1, 2]
    assert all(r["tg"]["tps"] > 0 for r in data["runs"])
    assert data["fastest_threads"] == max(data["runs"], key=lambda r: r["tg"]["tps"])["threads"]
    table = run_cli("bench", tiny_gguf, "-p", "16", "-n", "4", "-r", "1", "-t", "1,2")
    assert "fastest generation: " in table.stdout


def test_bench_rejects_a_bad_thread_list(tiny_gguf):  # noqa: F811
    result = run_cli("bench", tiny_gguf, "-t", "1,x")
    assert result.returncode != 0 and "comma-separated" in result.stderr and "Traceback" not in result.stderr
