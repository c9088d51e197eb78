"""Nothing the user typed is lost when the process dies: the REPL's journal, and `qwen35 run --resume`."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from qwen35.runtime.conversation import journal as journals
from tests.test_runtime_cli import Terminal
from tests.test_runtime import tiny_gguf  # noqa: F401  (the fixture)


class FakeSession:
    def __init__(self, messages, system=None, think=None):
        self.messages, self.system, self.think = messages, system, think


def test_write_atomically_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    journals.write_atomically(target, b"old")
    journals.write_atomically(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_latest_journal_of_this_model_is_found(tmp_path):
    mine, other = {"name": "a.gguf", "size": 1}, {"name": "b.gguf", "size": 2}
    first = journals.Journal.new("a.gguf", mine, tmp_path)
    first.record(FakeSession([{"role": "user", "content": "one"}]))
    time.sleep(1.1)  # "updated" has one-second resolution
    second = journals.Journal.new("a.gguf", mine, tmp_path)
    second.record(FakeSession([{"role": "user", "content": "two"}]), pending="three")
    journals.Journal.new("b.gguf", other, tmp_path).record(FakeSession([{"role": "user", "content": "else"}]))
    journal, entry = journals.latest(mine, tmp_path)
    assert journal.path == second.path
    assert entry["messages"] == [{"role": "user", "content": "two"}] and entry["pending"] == "three"
    assert journals.latest({"name": "c.gguf"}, tmp_path) is None


def test_a_journal_that_cannot_be_written_warns_once_and_the_chat_goes_on(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    journal = journals.Journal.new("a.gguf", {}, blocked / "sub")
    first = journal.record(FakeSession([]))
    assert first and "cannot keep the conversation" in first
    assert journal.record(FakeSession([])) is None


def test_old_journals_are_pruned(tmp_path):
    for i in range(journals.KEEP + 5):
        (tmp_path / f"2026{i:04d}-x.json").write_text("{}")
    journals.Journal.new("x.gguf", {}, tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == journals.KEEP - 1


def test_restore_evaluates_the_conversation_once_and_renders_it_exactly(tiny_gguf):  # noqa: F811
    from qwen35.runtime import ChatSession

    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=1, max_tokens=6) as chat:
        chat.send("first message", temp=0)
        chat.send("second message", temp=0)
        messages = [dict(m) for m in chat.messages]
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=1, max_tokens=6) as resumed:
        resumed.restore(messages)
        resumed.send("third message", temp=0)
        assert resumed.messages[:4] == messages
        rendered = resumed.tokenize(resumed.template.render(resumed._conversation()[:-1], add_generation_prompt=True,
                                                            think=None))
        assert resumed.stats["prompt_tokens"] + resumed.stats["cached_tokens"] == len(rendered)


def _journal_files(state_home):
    return sorted((state_home / "qwen35" / "conversations").glob("*.json"))


def test_killed_mid_reply_then_resumed_with_every_earlier_turn(tiny_gguf, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    term = Terminal("run", tiny_gguf, "--seed", "1", "--max-tokens", "4000", "--ctx-size", "8192")
    term.expect(">>> ")
    for text in ("the first question", "the second question"):
        term.send(text + "\n")
        term.expect("\033[2m", timeout=60)  # its reply is streaming
        term.send("\x03")  # Ctrl-C: a short reply, the turn kept
        term.expect(">>> ", timeout=60)
    term.send("the third question, never answered\n")
    term.expect("\033[2m", timeout=60)  # the reply has started …
    os.kill(term.pid, signal.SIGKILL)  # … and the process dies without a word
    os.waitpid(term.pid, 0)

    (path,) = _journal_files(tmp_path)
    entry = json.loads(path.read_text())
    assert [m["content"] for m in entry["messages"] if m["role"] == "user"] == ["the first question",
                                                                                  "the second question"]
    assert [m["role"] for m in entry["messages"]] == ["user", "assistant"] * 2
    assert entry["pending"] == "the third question, never answered"
    assert not path.with_suffix(".session").exists()  # no clean exit: no model state

    again = Terminal("run", tiny_gguf, "--seed", "1", "--max-tokens", "4", "--ctx-size", "8192", "--resume")
    shown = again.expect(">>> ", timeout=60)
    assert "Resumed a conversation of 4 messages" in shown and "evaluated once" in shown
    assert "/retry sends it again" in shown
    again.send("/retry\n")
    again.expect(">>> ", timeout=60)
    saved = tmp_path / "after.session"
    again.send(f"/save {saved}\n")
    assert "saved 6 messages" in again.expect(">>> ")
    again.send("/exit\n")
    assert again.wait() == 0
    header = json.loads(saved.read_bytes()[20:20 + int.from_bytes(saved.read_bytes()[12:20], "little")])
    users = [m["content"] for m in header["messages"] if m["role"] == "user"]
    assert users == ["the first question", "the second question", "the third question, never answered"]
    assert header["messages"][:4] == entry["messages"]

    # A clean exit saved the model state: the next resume restores it instead of evaluating.
    (path,) = _journal_files(tmp_path)
    assert path.with_suffix(".session").is_file()
    third = Terminal("run", tiny_gguf, "--resume", "--ctx-size", "8192")
    assert "model state restored" in third.expect(">>> ", timeout=60)
    third.send("\x04")
    assert third.wait() == 0


def test_resume_with_a_prompt_is_refused(tiny_gguf):  # noqa: F811
    from tests.test_runtime_cli import run_cli

    result = run_cli("run", tiny_gguf, "-p", "hi", "--resume")
    assert result.returncode == 1 and "--resume takes up the interactive chat" in result.stderr
