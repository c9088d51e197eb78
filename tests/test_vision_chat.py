"""Chatting about images: an image is encoded once, later turns evaluate only their new text, and
the state they reuse gives the logits a fresh evaluation of the same conversation gives; positions
and cells part ways after an image (M-RoPE) and stay exact through checkpoints and save/load; bad
images are one line and leave the conversation as it was. On tests/vision_fixture.py's tiny
vision-language checkpoint, converted with its mmproj beside it (as `qwen35 convert` names it)."""

import json
import struct

import numpy as np
import pytest

from tests.test_runtime_cli import Terminal, run_cli
from tests.vision_fixture import N_IMAGE_TOKENS, write_png

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from qwen35.runtime import ChatError, ChatSession  # noqa: E402
from qwen35.runtime.engine.state_cache import HELD_POSITION, image_cells, position  # noqa: E402

N_POS = 4  # the fixture's image: 4 × 3 merged patches, M-RoPE advances max(4, 3)


@pytest.fixture(scope="module")
def fixture(vision_fixture):
    return vision_fixture


@pytest.fixture(scope="module")
def model(fixture, tmp_path_factory):
    """The text GGUF, with its mmproj beside it."""
    from qwen35.convert.pipeline import Conversion

    out = tmp_path_factory.mktemp("vision-chat")
    text, mmproj = Conversion(fixture.checkpoint, ["f32"], out / "", mmproj="f16").run()
    assert mmproj.path.parent == text.path.parent
    return text.path


def _session(model, **options):
    return ChatSession(model, n_ctx=1024, threads=2, seed=0, adapt_threads=False, **options)


def _reply_state(session, text, images=None):
    """The logits that start the reply, and the cells the context holds then."""
    for _ in session.stream(text, images, temp=0, max_tokens=4):
        return session.decoder.ctx.logits(-1), session.context_tokens()


def test_image_cells_carry_the_image_and_its_positions():
    digest = bytes(range(32))
    cells = image_cells(digest, 12, 4)
    assert len(cells) == 12 and position(cells) == 4 and cells[4:] == (HELD_POSITION,) * 8
    assert all(c < HELD_POSITION for c in cells[:4])  # never a token id, never "no position"
    assert cells[0] == -2 - (int.from_bytes(digest[:4], "little") & 0x3FFFFFFF)
    assert image_cells(bytes(32), 12, 4) != cells  # another image, another key
    assert image_cells(digest, 16, 4) != cells  # another token budget, another key
    assert position([5, 6] + list(cells) + [7]) == 2 + 4 + 1
    with pytest.raises(ValueError):
        image_cells(digest, 4, 5)


def test_later_turns_never_reevaluate_the_image_and_match_a_fresh_evaluation(model, fixture):
    with _session(model) as chat:
        chat.send("What is in this picture?", [fixture.image], temp=0, max_tokens=4)
        assert chat.stats["image_tokens"] == N_IMAGE_TOKENS and chat.stats["image_encode_s"] > 0
        held = chat.context_tokens()
        image_start = held.index(HELD_POSITION) - N_POS
        image_end = image_start + N_IMAGE_TOKENS
        # Positions and cells apart: llama.cpp's next position is the cells less the 8 that share one.
        assert chat.decoder.ctx.n_past() == position(held) == len(held) - (N_IMAGE_TOKENS - N_POS)
        for text in ("And its colours?", "Thanks."):
            logits, context = _reply_state(chat, text)
            s = chat.stats
            assert s["image_tokens"] == 0 and s["image_encode_s"] is None
            # Only the new text was evaluated (by this turn or the prefill before it): everything up
            # to and past the image came from the checkpoint.
            assert s["cached_tokens"] > image_end and s["prompt_tokens"] > 0
            assert all(c >= 0 for c in context[s["cached_tokens"]:])
            held = chat.context_tokens()  # (after the prefill the reply's end started)
            assert chat.decoder.ctx.n_past() == position(held)
        conversation = [dict(m) for m in chat.messages[:-2]]

    with _session(model, prefill=False) as fresh:
        fresh.add_image(fixture.image)
        fresh.messages = conversation
        full, full_context = _reply_state(fresh, "Thanks.")
        assert fresh.stats["image_tokens"] == N_IMAGE_TOKENS and fresh.stats["cached_tokens"] == 0
    assert context == full_context
    np.testing.assert_allclose(logits, full, atol=1e-3 * np.abs(full).max())
    assert logits.argmax() == full.argmax()


def test_the_image_sits_where_the_template_puts_it(model, fixture):
    with _session(model, prefill=False) as chat:
        _, context = _reply_state(chat, "Describe it.", [fixture.image])
        rendered = chat.template.render(chat.messages[:1], add_generation_prompt=True, think=None)
        assert "<|vision_start|><|image_pad|><|vision_end|>Describe it." in rendered
        before, after = rendered.split("<|vision_start|><|image_pad|><|vision_end|>")
        start, end = chat.tokenize("<|vision_start|>"), chat.tokenize("<|vision_end|>")
        expected = chat.tokenize(before) + start + [c for c in context if c < 0] + end + chat.tokenize(after)
        assert context[:len(expected)] == expected and len([c for c in context if c < 0]) == N_IMAGE_TOKENS
        assert chat.messages[0]["content"][0]["type"] == "image"


def test_save_and_load_keep_the_image_and_its_positions(model, fixture, tmp_path):
    with _session(model) as chat:
        chat.send("Look.", [fixture.image], temp=0, max_tokens=4)
        chat.save(tmp_path / "chat.qwen35")
        expected = chat.send("And now?", temp=0, max_tokens=6)
        expected_context = chat.context_tokens()
    with _session(model) as resumed:
        resumed.load(tmp_path / "chat.qwen35")
        reply = resumed.send("And now?", temp=0, max_tokens=6)
        assert resumed.stats["image_tokens"] == 0  # the image came back with the state, not re-encoded
        assert reply.content == expected.content and reply.reasoning == expected.reasoning
        assert resumed.context_tokens() == expected_context
        assert resumed.decoder.ctx.n_past() == position(expected_context)


def _other_model_mmproj(mmproj, tmp_path):
    """A copy of the mmproj whose output width says it belongs to another model."""
    data = bytearray(mmproj.read_bytes())
    key = b"clip.vision.projection_dim"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF u32
    width = struct.unpack_from("<I", data, at + 4)[0]
    struct.pack_into("<I", data, at + 4, width * 2)
    path = tmp_path / "other-mmproj-F16.gguf"
    path.write_bytes(bytes(data))
    return path


def _bad_images(fixture, tmp_path):
    png = fixture.image.read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "empty.png").write_bytes(b"")
    write_png(tmp_path / "huge.png", np.full((1024, 1024, 3), 128, np.uint8))  # 1024 tokens > a 256-token context
    return [(tmp_path / "missing.png", "does not exist"), (tmp_path / "cut.png", "truncated"),
            (tmp_path / "notes.png", "is not an image"), (tmp_path / "empty.png", "is empty"),
            (tmp_path, "is not a file")]


def test_bad_images_are_one_line_and_leave_the_conversation_intact(model, fixture, tmp_path):
    with _session(model) as chat:
        chat.send("Hello.", temp=0, max_tokens=3)
        before = [dict(m) for m in chat.messages]
        for path, message in _bad_images(fixture, tmp_path):
            with pytest.raises(ChatError, match=message):
                chat.send("What is this?", [path])
            assert chat.messages == before
        chat.send("What is this?", [fixture.image], temp=0, max_tokens=3)  # and the chat goes on
        assert chat.stats["image_tokens"] == N_IMAGE_TOKENS and len(chat.messages) == 4
    with ChatSession(model, n_ctx=256, threads=2, prefill=False) as small:
        with pytest.raises(ChatError, match="takes 1024 tokens, more than the 256-token context"):
            small.send("Big.", [tmp_path / "huge.png"])
        assert small.messages == []


def test_image_max_tokens_bounds_the_image(model, fixture, tmp_path):
    write_png(tmp_path / "big.png", np.full((512, 512, 3), 50, np.uint8))  # 256 tokens at full size
    with ChatSession(model, n_ctx=1024, threads=2, prefill=False, image_max_tokens=64) as chat:
        chat.send("Big.", [tmp_path / "big.png"], max_tokens=2)
        assert 8 <= chat.stats["image_tokens"] <= 64


def test_mmproj_of_another_model_and_a_text_only_model(model, fixture, tmp_path):
    mmproj = next(model.parent.glob("*-mmproj-F16.gguf"))
    with pytest.raises(ChatError, match="belongs to another model"):
        ChatSession(model, n_ctx=256, threads=2, mmproj=_other_model_mmproj(mmproj, tmp_path))
    alone = tmp_path / "alone" / model.name
    alone.parent.mkdir()
    alone.symlink_to(model)
    with ChatSession(alone, n_ctx=256, threads=2, prefill=False) as chat:
        with pytest.raises(ChatError, match=f"no vision tower beside it: images need .*{mmproj.name}"):
            chat.send("Look.", [fixture.image])
        assert chat.messages == []
        assert chat.send("Hi.", max_tokens=2).finish_reason  # text still works


# --- through the CLI ------------------------------------------------------------------------------


def test_run_with_images_as_json(model, fixture):
    result = run_cli("run", model, "--image", fixture.image, "--image", fixture.image, "-p", "Compare them.",
                     "--json", "--temp", "0", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["image_tokens"] == 2 * N_IMAGE_TOKENS and stats["image_encode_s"] > 0


def test_run_with_an_explicit_mmproj_and_a_token_bound(model, fixture, tmp_path):
    alone = tmp_path / model.name
    alone.symlink_to(model)
    mmproj = next(model.parent.glob("*-mmproj-F16.gguf"))
    result = run_cli("run", alone, "--image", fixture.image, "--mmproj", mmproj, "--image-max-tokens", "8",
                     "-p", "What is it?", "--json", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert 0 < json.loads(result.stdout)["stats"]["image_tokens"] <= 12


def test_run_bad_input_is_one_line(model, fixture, tmp_path):
    alone = tmp_path / "alone" / model.name
    alone.parent.mkdir()
    alone.symlink_to(model)
    mmproj = next(model.parent.glob("*-mmproj-F16.gguf"))
    cases = [(("run", model, "--image", path, "-p", "Hi"), message) for path, message in _bad_images(fixture, tmp_path)]
    cases += [
        (("run", alone, "--image", fixture.image, "-p", "Hi"), "-mmproj-F16.gguf"),
        (("run", model, "--mmproj", _other_model_mmproj(mmproj, tmp_path), "-p", "Hi"), "belongs to another model"),
        (("run", model, "--mmproj", model, "-p", "Hi"), "is not an mmproj file"),
        (("run", model, "--image", tmp_path / "huge.png", "-c", "256", "-p", "Hi"), "more than the 256-token context"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode != 0 and result.stderr.startswith("error: "), (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


def test_repl_attaches_images_to_the_next_message(model, fixture, tmp_path):
    term = Terminal("run", model, "--max-tokens", "3", "--ctx-size", "1024", "--seed", "1")
    term.expect(">>> ")
    term.send(f"/image {tmp_path / 'missing.png'}\n")
    assert "does not exist" in term.expect(">>> ")
    term.send(f"/image {fixture.image}\n")
    assert f"({N_IMAGE_TOKENS + 2} tokens) goes with your next message" in term.expect(">>> ")
    term.send("What is it?\n")
    term.expect(">>> ")
    term.send("/stats\n")
    assert f"images: {N_IMAGE_TOKENS} tokens" in term.expect(">>> ")
    term.send("And again?\n")  # the image stays in the conversation, not re-attached
    term.expect(">>> ")
    term.send("/stats\n")
    assert "images:" not in term.expect(">>> ")
    term.send("/exit\n")
    assert term.wait() == 0


# --- through the server ---------------------------------------------------------------------------


def test_server_takes_image_url_parts_and_reuses_them(model, fixture):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    try:
        import httpx2 as httpx
    except ImportError:
        httpx = pytest.importorskip("httpx")
    import base64

    from tests.serving import running

    url = "data:image/png;base64," + base64.b64encode(fixture.image.read_bytes()).decode()
    with _session(model, prefill=False, cache_ram=64 << 20) as session, \
            running(session, model_name="tiny") as srv:
        base = srv.base_url + "/v1/chat/completions"

        def post(messages):
            return httpx.post(base, json={"messages": messages, "temperature": 0, "max_tokens": 3}, timeout=120)

        first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": "What is it?"}]}]
        r = post(first)
        assert r.status_code == 200, r.text
        assert session.stats["image_tokens"] == N_IMAGE_TOKENS
        answer = r.json()["choices"][0]["message"]
        history = first + [{"role": "assistant", "content": answer["content"] or ""},
                           {"role": "user", "content": "And its colours?"}]
        r = post(history)
        assert r.status_code == 200, r.text
        assert session.stats["image_tokens"] == 0  # the image came from the checkpoint
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > N_IMAGE_TOKENS
        for bad, message in [("https://example.com/cat.png", "fetches nothing from the network"),
                             ("data:image/png;base64,@@@", "not valid base64"),
                             ("data:image/png;base64," + base64.b64encode(b"no picture").decode(),
                              "is not an image")]:
            r = post([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}])
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert post(history).status_code == 200  # and it keeps serving
        assert len(session.media.images) == 1  # only the images of the last request are kept


def test_an_image_split_over_batches_gives_the_same_logits(model, fixture, tmp_path):
    """n_batch below the image's token count (VISION.md §5.6): mtmd feeds the image in pieces, and
    the M-RoPE positions of every piece must be those of the whole."""
    from qwen35.runtime.engine import native
    from qwen35.runtime.engine.vision import Projector

    write_png(tmp_path / "wide.png", np.random.default_rng(1).integers(0, 256, (96, 256, 3), dtype=np.uint8))
    mmproj = next(model.parent.glob("*-mmproj-F16.gguf"))
    native.init()
    weights = native.Model(str(model))
    projector = Projector(mmproj, weights, native.L.llama_model_n_embd(weights.ptr), threads=2)
    text = weights.tokenize("<|im_start|>user\n")
    after = weights.tokenize("What is it?<|im_end|>\n<|im_start|>assistant\n")
    logits = []
    try:
        for n_batch in (8, 64):
            ctx = native.Context(weights, 256, 2, n_batch=n_batch, exact=True)
            image = projector.image(tmp_path / "wide.png")
            chunks = projector.tokenize(projector.marker, [image])
            image.close()
            start, picture, end = chunks.items
            assert picture.n_tokens == 24 > 8 and picture.n_pos == 8  # 8 × 3 merged patches
            cells = text + list(start.tokens)
            ctx.decode(cells, 0)
            pos = projector.eval(ctx, picture, len(cells), logits_last=False)
            assert pos == len(cells) + picture.n_pos
            cells_held = len(cells) + picture.n_tokens
            for t in list(end.tokens) + after:
                ctx.decode([t], pos, cells=cells_held)
                pos, cells_held = pos + 1, cells_held + 1
            logits.append(ctx.logits(-1))
            assert ctx.n_past() == pos
            chunks.close()
            ctx.close()
    finally:
        projector.close()
        weights.close()
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4 * np.abs(logits[1]).max())


def test_run_image_goes_with_the_first_message_of_the_chat(model, fixture):
    term = Terminal("run", model, "--image", fixture.image, "--max-tokens", "3", "--ctx-size", "1024")
    term.expect(">>> ")
    term.send("What is it?\n")
    term.expect(">>> ")
    term.send("/stats\n")
    assert f"images: {N_IMAGE_TOKENS} tokens" in term.expect(">>> ")
    term.send("/exit\n")
    assert term.wait() == 0


def test_repl_keeps_the_images_of_a_message_that_did_not_fit(model, fixture):
    term = Terminal("run", model, "--max-tokens", "3", "--ctx-size", "256")
    term.expect(">>> ")
    term.send(f"/image {fixture.image}\n")
    term.expect(">>> ")
    term.send("word " * 300 + "\n")
    assert "no longer fits" in term.expect(">>> ")
    term.send("Short, then.\n")
    term.expect(">>> ")
    term.send("/stats\n")
    assert f"images: {N_IMAGE_TOKENS} tokens" in term.expect(">>> ")
    term.send("/exit\n")
    assert term.wait() == 0


# --- memory ---------------------------------------------------------------------------------------


def test_memory_estimate_counts_the_vision_tower_and_the_image_budget(model, fixture):
    from qwen35.runtime.engine import memory, native
    from qwen35.runtime.engine.modelfile import read_model_file
    from qwen35.runtime.engine.vision import find_mmproj

    mmproj = read_model_file(find_mmproj(read_model_file(model))[0])
    weights = sum(t.nbytes for t in mmproj.tensors)
    # By hand: 1024 tokens of 2×2 patches; per patch 7 widths (64) and 3 × 16² pixels, f32; the
    # image's embeddings at the text width (64 here too).
    assert memory.image_compute_bytes(mmproj, 1024) == 4096 * (7 * 64 + 3 * 256) * 4
    assert memory.vision_bytes(mmproj, 1024) == weights + 4096 * (7 * 64 + 3 * 256) * 4 + 1024 * 64 * 4
    with _session(model, image_max_tokens=1024) as chat:
        assert chat.memory.vision == memory.vision_bytes(mmproj, 1024)
        assert "vision tower + buffers for 1024-token images" in chat.memory.describe()
        native.log.clear()
        chat.send("hi", [fixture.image], temp=0, max_tokens=1)
        logged = [float(line.split("=")[1].split()[0]) * 2 ** 20 for line in native.log.lines
                  if "compute buffer size" in line and "reserve_compute_meta" in line]
    # What llama.cpp reserved to encode the fixture's image, against the estimate for its tokens.
    assert logged and logged[-1] <= memory.image_compute_bytes(mmproj, N_IMAGE_TOKENS) <= 1.3 * logged[-1]
    with _session(model, mmproj=None, image_max_tokens=None) as chat:  # llama.cpp's own bound: 4096 tokens
        assert chat.memory.vision == memory.vision_bytes(mmproj, 4096)


def test_refuses_before_loading_when_the_image_budget_does_not_fit(model, monkeypatch):
    from qwen35.runtime.engine import memory
    from qwen35.runtime.engine.modelfile import read_model_file
    from qwen35.runtime.engine.vision import find_mmproj

    mf = read_model_file(model)
    mmproj = read_model_file(find_mmproj(mf)[0])
    sizes = dict(n_batch=512, n_checkpoints=4, threads=2)
    big = memory.estimate(mf, 1024, **sizes, mmproj=mmproj, image_max_tokens=4096)
    small = memory.estimate(mf, 1024, **sizes, mmproj=mmproj, image_max_tokens=256, process=big.process)
    assert big.needed - small.needed == memory.vision_bytes(mmproj, 4096) - memory.vision_bytes(mmproj, 256)
    message = memory.check_fits(mf, big, available=small.needed + 1, **sizes, mmproj=mmproj)
    assert "--image-max-tokens 256 would fit" in message and "--force" in message

    loads = []
    monkeypatch.setattr(memory, "available_ram", lambda: small.needed + 1)
    monkeypatch.setattr("qwen35.runtime.engine.native.Model.__init__", lambda *a, **k: loads.append(a))
    with pytest.raises(ChatError, match=r"vision tower \+ buffers for 4096-token images.*--image-max-tokens \d+ would fit"):
        ChatSession(model, n_ctx=1024, threads=2, image_max_tokens=4096)
    assert loads == []  # refused before loading anything


# --- the journal: a crash loses no image ------------------------------------------------------------


def test_retry_and_resume_after_a_crash_show_the_images_again(model, fixture, tmp_path, monkeypatch):
    import os
    import shutil
    import signal

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    shutil.copy(fixture.image, first)
    write_png(second, np.random.default_rng(7).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    term = Terminal("run", model, "--max-tokens", "4000", "--ctx-size", "1024", "--seed", "1")
    term.expect(">>> ")
    term.send(f"/image {first}\n")
    term.expect(">>> ")
    term.send("What is the first?\n")
    term.expect("\033[2m", timeout=60)  # its reply is streaming
    term.send("\x03")  # a short reply, the turn kept
    term.expect(">>> ", timeout=60)
    term.send(f"/image {second}\n")
    term.expect(">>> ")
    term.send("And the second?\n")
    term.expect("\033[2m", timeout=60)
    os.kill(term.pid, signal.SIGKILL)  # the process dies mid-reply
    os.waitpid(term.pid, 0)
    first.unlink()
    second.unlink()  # only the journal holds the images now

    (journal,) = (tmp_path / "state" / "qwen35" / "conversations").glob("*.json")
    entry = json.loads(journal.read_text())
    assert entry["pending"]["text"] == "And the second?" and len(entry["pending"]["images"]) == 1
    assert len(list(journal.with_suffix(".images").iterdir())) == 2

    again = Terminal("run", model, "--max-tokens", "3", "--ctx-size", "1024", "--seed", "1", "--resume")
    shown = again.expect(">>> ", timeout=60)
    assert "evaluated once" in shown and "/retry sends it again with its images" in shown
    again.send("/retry\n")
    assert "error" not in again.expect(">>> ", timeout=60)
    again.send("/stats\n")
    assert f"images: {N_IMAGE_TOKENS} tokens" in again.expect(">>> ")  # the second image; the first came back too
    saved = tmp_path / "after.session"
    again.send(f"/save {saved}\n")
    again.expect(">>> ")
    again.send("/exit\n")
    assert again.wait() == 0
    header = json.loads(saved.read_bytes()[20:20 + int.from_bytes(saved.read_bytes()[12:20], "little")])
    users = [m["content"] for m in header["messages"] if m["role"] == "user"]
    assert [[p["type"] for p in u] for u in users] == [["image", "text"], ["image", "text"]]
    assert users[1][0]["image"] == entry["pending"]["images"][0]["image"]
