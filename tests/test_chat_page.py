"""The chat page in a real browser: Debian's headless Chromium, driven by Playwright (never a browser
download: `executable_path` is the system's), against `qwen35 serve`'s Server on 127.0.0.1 over the
tiny random-weight Qwen3.5 GGUF (its words are noise; what is tested is what the page does), and
the tiny vision model with its mmproj for images.

QWEN35_CHROMIUM names another Chromium; without one the tests skip. QWEN35_SCREENSHOT=PATH makes
test_the_demo_model_answers_on_the_page_and_the_readmes_screenshot save the README's screenshot there
(the trained demo model, demo/weights).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("QWEN35_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.exists():
    pytest.skip(f"the chat page's browser tests need Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the chat page's browser tests need playwright")

from qwen35.runtime import ChatSession  # noqa: E402
from qwen35.runtime.conversation import journal as journals  # noqa: E402

from tests.test_conversations import Served, served, session  # noqa: E402,F401 (the same server fixtures)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000
# What each test's browser starts with (unless the test says otherwise): short greedy replies, no reasoning.
SHORT = {"max_tokens": "24", "temperature": "0", "seed": "1"}


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as p:
        yield p


class Browser:
    """One fresh Chromium (its own user-data-dir) on the page; what went wrong in it is kept."""

    def __init__(self, playwright, profile: Path, url: str, *, settings=SHORT, think=False,
                 viewport=(1100, 720), wait_ready=True) -> None:
        self.context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": viewport[0], "height": viewport[1]})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.context.add_init_script(
            "if (!sessionStorage.getItem('qwen35.test')) {"
            f" localStorage.setItem('qwen35.settings', {repr(json.dumps(settings))});"
            f" localStorage.setItem('qwen35.think', '{str(think).lower()}');"
            " sessionStorage.setItem('qwen35.test', '1'); }")
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("dialog", lambda d: d.accept())
        self.page.goto(url)
        if wait_ready:
            self.ready()

    def ready(self) -> None:
        self.page.wait_for_selector("body[data-ready=true]")

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")
        self.wait_reply()

    def wait_reply(self) -> None:
        """Until the reply has ended and the page shows the conversation as the server keeps it."""
        self.page.wait_for_selector("#stop", state="hidden")
        self.page.wait_for_selector("#send", state="visible")
        self.wait_until("!document.querySelector('.content.cursor')")

    def wait_until(self, script: str, timeout: float = TIMEOUT_MS / 1000) -> None:
        """Until `script` (an expression, or a function) is true in the page. Polled from here:
        Playwright's wait_for_function would evaluate a string in the page, which its CSP forbids."""
        deadline = time.monotonic() + timeout
        while not self.page.evaluate(script):
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never made this true: {script}")
            time.sleep(0.05)

    def texts(self, selector: str) -> list[str]:
        return self.page.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def browser(playwright, served, tmp_path):
    opened = []

    def open_browser(**options) -> Browser:
        b = Browser(playwright, tmp_path / f"profile{len(opened)}", options.pop("url", served.url + "/"), **options)
        opened.append(b)
        return b

    yield open_browser
    for b in opened:
        b.close()
        assert not b.errors, b.errors


def _conversation_id(b: Browser) -> str:
    return b.page.evaluate("location.hash").removeprefix("#/c/")


def test_a_message_streams_its_reply_and_the_conversation_is_there_after_a_reload(browser, served):
    b = browser(settings={**SHORT, "max_tokens": "60"})
    b.page.fill("#input", "Hello there, how are you?")
    b.page.press("#input", "Enter")
    # While the reply streams, the page shows what has come so far (the cursor marks a reply under way).
    b.wait_until("""() => {
        const reply = document.querySelector('.message.assistant:last-child .content.cursor');
        return reply && reply.textContent.trim().length > 0; }""")
    b.wait_reply()
    reply = b.texts(".message.assistant .content")[-1]
    figures = b.texts(".message.assistant .figures")[-1]
    assert reply.strip() and "tokens/s" in figures and "first token" in figures and "reused from the cache" in figures
    conversation = _conversation_id(b)
    kept = served.read(conversation)
    assert kept["messages"][-1]["content"].strip() == reply.strip()

    b.page.reload()
    b.ready()
    assert b.texts("#conversation-list .open-conversation") == ["Hello there, how are you?"]
    assert b.texts(".message.user .bubble") == ["Hello there, how are you?"]
    assert b.texts(".message.assistant .content")[-1] == reply
    b.page.goto(served.url + "/")  # no conversation open: the list finds it
    b.ready()
    b.page.click("#conversation-list .open-conversation")
    b.page.wait_for_selector(".message.assistant .content")
    assert b.texts(".message.assistant .content")[-1] == reply


def test_stop_ends_the_reply_and_what_was_written_is_kept(browser, served):
    # (Sampled: greedy, the random model repeats itself within ~20 tokens and the guard ends the reply first.)
    b = browser(settings={**SHORT, "max_tokens": "3000", "temperature": "1"})
    b.page.fill("#input", "Hello there, how are you?")
    b.page.press("#input", "Enter")
    b.wait_until("""() => {
        const reply = document.querySelector('.message.assistant:last-child .content.cursor');
        return reply && reply.textContent.length > 20; }""")
    b.page.click("#stop")
    b.wait_reply()
    assert "stopped" in b.texts(".message.assistant .figures")[-1]
    (user, reply) = served.read(_conversation_id(b))["messages"]
    assert reply["stats"]["finish_reason"] == "interrupted" and reply["stats"]["gen_tokens"] < 3000
    assert b.texts(".message.assistant .content")[-1].strip() == reply["content"].strip()


def test_edit_and_resend_then_regenerate(browser, served):
    b = browser()
    b.send("the first question")
    b.send("the second question")
    assert len(b.texts(".message")) == 4
    b.page.locator(".message.user .edit").first.click()
    b.page.fill(".message.user textarea", "the first question, edited")
    b.page.click(".save-edit")
    b.wait_reply()
    assert b.texts(".message.user .bubble") == ["the first question, edited"]
    messages = served.read(_conversation_id(b))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "the first question, edited"

    # Settings and the thinking switch, as a user sets them, go with the next request.
    b.page.click("#open-settings")
    b.page.fill("#settings-form [name=temperature]", "1")
    b.page.fill("#settings-form [name=seed]", "7")
    b.page.fill("#settings-form [name=max_tokens]", "5")
    b.page.click("#save-settings")
    b.page.check("#think")
    b.page.click(".message.assistant .regenerate")
    b.wait_reply()
    kept = served.read(_conversation_id(b))
    again = kept["messages"]
    assert len(again) == 2 and again[0] == messages[0] and again[1]["stats"]["gen_tokens"] == 5
    assert kept["think"] is True and again[1].get("reasoning_content")  # (the tiny model reasons for 5 tokens)
    assert b.texts(".message.assistant .content")[-1].strip() == again[1]["content"].strip()
    assert b.texts(".message.assistant .reasoning-text")[-1] == again[1]["reasoning_content"]


def test_conversations_new_rename_search_and_delete(browser, served):
    b = browser()
    b.send("about foxes")
    b.page.click("#new-chat")
    assert b.texts(".message") == []
    b.send("about owls")
    assert b.texts("#conversation-list .open-conversation") == ["about owls", "about foxes"]

    foxes = b.page.locator("#conversation-list li", has_text="about foxes")
    foxes.hover()  # (its buttons show on hover)
    foxes.locator(".rename").click()
    b.page.fill("#conversation-list input", "Foxes, renamed")
    b.page.press("#conversation-list input", "Enter")
    b.page.wait_for_selector("#conversation-list .open-conversation >> text=Foxes, renamed")
    assert sorted(c["title"] for c in served.get("/v1/conversations").json()["data"]) == ["Foxes, renamed", "about owls"]

    b.page.fill("#search", "fox")
    assert b.texts("#conversation-list .open-conversation") == ["Foxes, renamed"]
    b.page.fill("#search", "")
    owls = b.page.locator("#conversation-list li", has_text="about owls")
    owls.hover()
    owls.locator(".delete").click()  # (the page's confirm() is accepted)
    b.wait_until("document.querySelectorAll('#conversation-list li').length === 1")
    assert [c["title"] for c in served.get("/v1/conversations").json()["data"]] == ["Foxes, renamed"]
    assert b.texts(".message") == []  # the open conversation was the one deleted


HOSTILE = [
    "<script>window.__pwned = 'script'</script>",
    "<img src=x onerror=\"window.__pwned = 'img onerror'\">",
    "[a link](javascript:window.__pwned='markdown%20link')",
    "<a href=\"javascript:window.__pwned='html link'\">another link</a>",
    "<svg onload=\"window.__pwned='svg'\"></svg><iframe srcdoc=\"<script>parent.__pwned='iframe'</script>\"></iframe>",
    "<form action=\"javascript:window.__pwned='form'\"><button>go</button></form>",
    "<a href=\"data:text/html,<script>alert(1)</script>\">data link</a> <b style=\"background:url(x)\">bold</b>",
]
UNSAFE = """() => {
    const found = [];
    for (const e of document.querySelectorAll('#messages *, #conversation-list *, #title, #attachments *')) {
        for (const a of e.attributes) {
            if (a.name.startsWith('on')) found.push(`${e.tagName} ${a.name}`);
            if (/^\\s*(javascript|data):/i.test(a.value) && ['href', 'src', 'action', 'formaction', 'xlink:href'].includes(a.name)
                && !(e.tagName === 'IMG' && a.value.startsWith('data:image/'))) found.push(`${e.tagName} ${a.name}=${a.value}`);
        }
        if (['SCRIPT', 'IFRAME', 'OBJECT', 'EMBED', 'FORM', 'STYLE'].includes(e.tagName)) found.push(e.tagName);
        if (e.hasAttribute('style') && e.closest('.content')) found.push(`${e.tagName} style`);
    }
    return found; }"""


def test_hostile_replies_and_names_run_nothing(browser, served, session):
    """A stored conversation (as a model might have written it) and a streamed reply full of markup:
    shown through the sanitizer, nothing runs, nothing dangerous reaches the page."""
    journal = journals.Journal.new("tiny.gguf", session.model_fingerprint, served.directory, prune=False)
    journal.title = "<img src=x onerror=\"window.__pwned='title'\">"
    hostile_name = "<img src=x onerror=\"window.__pwned='file name'\">.png"
    image_id = journal.keep_image(b"\x89PNG\r\n\x1a\n not really")
    journal.write([{"role": "user", "content": [{"type": "image", "image": image_id, "name": hostile_name},
                                                {"type": "text", "text": "<b onclick=\"window.__pwned='user'\">hi</b>"}]},
                   {"role": "assistant", "content": "\n\n".join(HOSTILE),
                    "reasoning_content": "<img src=x onerror=\"window.__pwned='reasoning'\">"}],
                  system=None, think=False)
    b = browser(url=f"{served.url}/#/c/{journal.id}")
    b.page.wait_for_selector(".message.assistant .content a")
    assert b.page.text_content("#title") == journal.title  # shown as text
    assert b.texts(".message.user figcaption") == [hostile_name]
    assert b.texts(".message.user .bubble") == ["<b onclick=\"window.__pwned='user'\">hi</b>"]
    assert "<img" in b.page.text_content(".reasoning-text")
    assert b.page.evaluate(UNSAFE) == []
    for link in b.page.locator(".message.assistant .content a").all():
        link.click(modifiers=["Shift"], no_wait_after=True)
    assert b.page.evaluate("window.__pwned") is None
    assert b.page.locator(".content strong, .content b").count() >= 1  # markdown and harmless HTML still render

    # A reply streamed with the same markup (the server answer scripted): checked at every change.
    b.page.evaluate("""() => { window.__unsafe = [];
        new MutationObserver(() => window.__unsafe.push(...(%s)())).observe(document.body, {subtree: true,
            childList: true, attributes: true}); }""" % UNSAFE)
    chunks = [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece + "\n\n"}}]}
              for piece in HOSTILE]
    stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    b.page.route("**/messages", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream))
    b.page.fill("#input", "again")
    b.page.press("#input", "Enter")
    b.wait_until("window.__unsafe !== undefined && document.querySelectorAll('.message.assistant').length >= 1")
    b.wait_reply()
    assert b.page.evaluate("window.__unsafe") == [] and b.page.evaluate("window.__pwned") is None
    # The sanitizer parses the markup in an inert document, where the page's Content-Security-Policy
    # refuses its inline handlers and styles too, and says so: nothing else went wrong.
    assert [e for e in b.errors if "Content Security Policy" not in e] == []
    b.errors.clear()


def test_with_a_key_the_page_asks_for_it_once_and_sends_it_as_a_bearer(playwright, session, tmp_path):
    keyed = Served(session, tmp_path / "conversations", api_key="sesame")
    b = Browser(playwright, tmp_path / "profile", keyed.url + "/", wait_ready=False)
    try:
        b.page.wait_for_selector("#key-dialog[open]")
        b.page.fill("#key-input", "wrong")
        b.page.click("#key-submit")
        b.page.wait_for_selector("#key-error:not([hidden])")
        assert "invalid API key" in b.page.text_content("#key-error")
        b.page.fill("#key-input", "sesame")
        b.page.click("#key-submit")
        b.ready()
        assert b.page.text_content("#model-name") == "tiny"
        b.send("Hello with a key")
        assert len(keyed.get("/v1/conversations", headers={"Authorization": "Bearer sesame"}).json()["data"]) == 1
        b.page.reload()
        b.ready()  # asked once: the key is remembered by this browser
        assert not b.page.is_visible("#key-dialog")
        assert b.context.cookies() == []  # nothing a cross-site request would carry
        assert [e for e in b.errors if "401 (Unauthorized)" not in e] == []
    finally:
        b.close()
        keyed.close()


@pytest.fixture(scope="module")
def vision_model(vision_fixture, tmp_path_factory):
    from qwen35.convert.pipeline import Conversion

    out = tmp_path_factory.mktemp("page-vision")
    text, _ = Conversion(vision_fixture.checkpoint, ["f32"], out / "", mmproj="f16").run()
    return text.path


def test_images_attach_by_picker_drop_and_paste_and_are_kept(playwright, vision_model, vision_fixture, tmp_path):
    png = vision_fixture.image.read_bytes()
    hostile = tmp_path / "<img src=x onerror=alert(1)>.png"
    hostile.write_bytes(png)
    with ChatSession(vision_model, n_ctx=2048, threads=2, cache_ram=128 << 20) as chat:
        served = Served(chat, tmp_path / "conversations")
        b = Browser(playwright, tmp_path / "profile", served.url + "/", settings={**SHORT, "max_tokens": "4"})
        try:
            assert b.page.is_visible("#attach")
            b.page.set_input_files("#file", str(hostile))
            data = base64.b64encode(png).decode()
            b.page.evaluate("""(data) => {
                const file = (name) => new File([Uint8Array.from(atob(data), c => c.charCodeAt(0))], name, {type: 'image/png'});
                const dropped = new DataTransfer(); dropped.items.add(file('dropped.png'));
                document.getElementById('chat').dispatchEvent(new DragEvent('drop', {dataTransfer: dropped, bubbles: true, cancelable: true}));
                const pasted = new DataTransfer(); pasted.items.add(file('pasted.png'));
                document.getElementById('input').dispatchEvent(new ClipboardEvent('paste', {clipboardData: pasted, bubbles: true, cancelable: true}));
            }""", data)
            b.wait_until("document.querySelectorAll('#attachments .attachment').length === 3")
            assert sorted(b.texts("#attachments .attachment span")) == sorted([hostile.name, "dropped.png", "pasted.png"])
            for name in ("dropped.png", "pasted.png"):
                b.page.locator("#attachments .attachment", has_text=name).locator(".remove-attachment").click()
            b.send("What is in this picture?")
            (user, reply) = served.read(_conversation_id(b))["messages"]
            image = user["content"][0]
            assert image["type"] == "image" and image["name"] == hostile.name and reply["stats"]["gen_tokens"] > 0
            kept = served.directory / f"{_conversation_id(b)}.images" / image["image"]
            assert kept.read_bytes() == png
            exported = served.get(f"/v1/conversations/{_conversation_id(b)}/export").json()["messages"][0]["content"]
            assert exported[0]["image_url"]["url"] == "data:image/png;base64," + data  # as an API request carries it
            # The page shows it as the server keeps it (fetched with the key, as a blob: URL), named as text.
            b.wait_until("document.querySelector('.message.user img')?.src.startsWith('blob:')")
            assert b.texts(".message.user figcaption") == [hostile.name]
            assert b.page.evaluate(UNSAFE) == []
            assert not b.errors
        finally:
            b.close()
            served.close()


def test_the_page_on_a_phone_and_its_screenshot(browser, served, session, tmp_path):
    """On a phone's screen the conversations are a drawer; the desktop view is the README's picture."""
    journal = journals.Journal.new("tiny.gguf", session.model_fingerprint, served.directory, prune=False)
    journal.title = "Reading a file line by line"
    journal.write([{"role": "user", "content": "How do I read a file line by line in Python?"},
                   {"role": "assistant", "reasoning_content": "The idiomatic way is to iterate over the file object.",
                    "content": "Iterate over the file object: it yields one line at a time, without reading the whole "
                               "file into memory.\n\n```python\nwith open(\"notes.txt\", encoding=\"utf-8\") as f:\n"
                               "    for line in f:\n        print(line.rstrip(\"\\n\"))\n```\n\n"
                               "`rstrip(\"\\n\")` drops the line ending; **`with`** closes the file.",
                    "stats": {"gen_tokens": 61, "gen_tps": 14.2, "ttft_s": 0.41, "cached_tokens": 0,
                              "prefilled_tokens": 0, "prompt_tokens": 19, "finish_reason": "stop"}}],
                  system=None, think=True)
    other = journals.Journal.new("tiny.gguf", session.model_fingerprint, served.directory, prune=False)
    other.title = "Packing list for a weekend hike"
    other.write([{"role": "user", "content": "What should I pack for a weekend hike?"}], system=None, think=False)

    phone = browser(url=f"{served.url}/#/c/{journal.id}", viewport=(390, 780))
    phone.page.wait_for_selector(".message.assistant .content pre code.hljs")  # highlighted
    assert not phone.page.locator("#conversation-list").is_visible() or \
        phone.page.evaluate("document.getElementById('sidebar').getBoundingClientRect().right <= 0")
    phone.page.click("#toggle-sidebar")
    phone.wait_until("document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    phone.page.locator("#conversation-list .open-conversation", has_text="Packing list").click()
    phone.wait_until("document.getElementById('sidebar').getBoundingClientRect().right <= 0")
    assert phone.texts(".message.user .bubble") == ["What should I pack for a weekend hike?"]
    width = phone.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing wider than the screen
    background = "getComputedStyle(document.body).backgroundColor"
    phone.page.emulate_media(color_scheme="light")
    light = phone.page.evaluate(background)
    phone.page.emulate_media(color_scheme="dark")
    assert (light, phone.page.evaluate(background)) == ("rgb(255, 255, 255)", "rgb(22, 24, 28)")  # as the system is

    desk = browser(url=f"{served.url}/#/c/{journal.id}", think=True, settings={**SHORT, "max_tokens": "40"})
    # The reasoning is shown apart from the answer, folded; a click unfolds it, another folds it again.
    desk.page.wait_for_selector(".message.assistant details.reasoning:not([open])")
    desk.page.click(".message.assistant details.reasoning summary")
    desk.page.wait_for_selector(".message.assistant details.reasoning[open] .reasoning-text >> text=The idiomatic way")
    desk.page.click(".message.assistant details.reasoning summary")
    desk.page.wait_for_selector(".message.assistant details.reasoning:not([open])")
    desk.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=served.url)
    desk.page.click(".content pre .copy-code")
    assert desk.page.evaluate("navigator.clipboard.readText()") == \
        'with open("notes.txt", encoding="utf-8") as f:\n    for line in f:\n        print(line.rstrip("\\n"))\n'
    desk.page.wait_for_selector(".content pre .copy-code >> text=Copy")  # (its "Copied" is gone before the picture)
    desk.send("And how do I count the lines?")
    shot = tmp_path / "chat-page.png"
    desk.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_the_demo_model_answers_on_the_page_and_the_readmes_screenshot(playwright, tmp_path):
    """The trained demo model on the page, as the README shows it: a fact, then a picture attached
    and what it shows."""
    import random

    from qwen35.demo.training import corpus

    from tests.test_demo_model import build_demo_gguf

    with ChatSession(str(build_demo_gguf()), n_ctx=4096, threads=2, think=False) as demo:
        served = Served(demo, tmp_path / "conversations")
        b = None
        try:
            b = Browser(playwright, tmp_path / "profile", served.url + "/",
                        settings={"max_tokens": "120", "temperature": "0", "seed": "1"})
            b.send("What is the capital of Japan?")
            assert "Tokyo" in b.texts(".message.assistant .content")[-1]
            png = tmp_path / "shapes.png"
            png.write_bytes(corpus.draw_scene(random.Random(3), [("red", "circle")], "white"))
            b.page.set_input_files("#file", str(png))
            b.wait_until("document.querySelectorAll('#attachments .attachment').length === 1")
            b.send("What is in this image?")
            assert "red circle" in b.texts(".message.assistant .content")[-1].lower()
            shot = tmp_path / "chat-page.png"
            b.page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("QWEN35_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["QWEN35_SCREENSHOT"])
            assert not b.errors, b.errors
        finally:
            if b is not None:
                b.close()
            served.close()
