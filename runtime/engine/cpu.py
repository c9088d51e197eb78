"""What llama.cpp's CPU backend uses on this machine, and where the AMX buffer type is allowed.

llama.cpp's CPU backend offers "extra buffer types" that repack weights at load time for faster
kernels: AMX (Intel Xeon tile instructions, for Q4_0 Q4_1 Q8_0 Q4_K Q5_K Q6_K IQ4_XS) and CPU_REPACK
(interleaved rows for NEON, AVX2 and AVX-512). The model loader puts each weight in the first of them
that takes it, else in plain CPU memory. Where llama-cpp-python was compiled by a GCC whose AMX
header is wrong (GCC 12.2, Debian 12's: see `amx_build_flaw`), its AMX kernels crash (SIGSEGV in
`ggml_backend_amx_mul_mat`, at the first decode of two or more tokens); other builds and machines may
have faults of their own. A native crash gives the user no message and loses the chat, so AMX is used
only where it has been seen to work:

- `auto` (the default): a build with the known flaw never gets AMX (a probe there can pass by luck);
  elsewhere, the first time a model's weight types meet a CPU and a llama.cpp build, a
  child process decodes a few tokens of that model with AMX and without it and compares the logits;
  the verdict is cached (`$XDG_CACHE_HOME/qwen35/amx-verdicts.json`). A crash, a hang or different
  logits switch AMX off. Machines without AMX (every AMD, ARM, older Intel) never probe.
- `QWEN35_AMX=on` or `off` decides without probing.

Switching AMX off removes only its entry from the list the CPU backend hands the model loader
(`ggml_backend_dev_get_extra_bufts`, a NULL-terminated array), so CPU_REPACK still takes exactly the
weights llama.cpp would give it. `use_extra_bufts = false` would switch off both.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import remembered

AMX = "AMX"
# ggml_type values AMX has kernels for (ggml-cpu/amx/common.h, qtype_has_amx_kernels).
AMX_TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 23: "IQ4_XS"}
SETTING_ENV = "QWEN35_AMX"
SETTINGS = ("auto", "on", "off")
_GGML_BACKEND_DEVICE_TYPE_CPU = 0


# --- the extra buffer types -------------------------------------------------------------------


class _ExtraBuffers:
    """The CPU backend's NULL-terminated list of extra buffer types, as the model loader reads it.

    The list is a static array inside ggml-cpu, built on first use; we read it once and may
    rewrite it with a subset of its original entries (it has room for all of them) before a model
    loads. Weights already loaded keep the buffers they landed in.
    """

    def __init__(self) -> None:
        ggml, base = _library("ggml"), _library("ggml-base")
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        base.ggml_backend_buft_name.restype = ctypes.c_char_p
        base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]

        self._array = None
        self.original: list[tuple[str, int]] = []  # (name, buffer type pointer), in loader order
        device = ggml.ggml_backend_dev_by_type(_GGML_BACKEND_DEVICE_TYPE_CPU)
        if not device:
            return
        address = ggml.ggml_backend_reg_get_proc_address(ggml.ggml_backend_dev_backend_reg(device),
                                                         b"ggml_backend_dev_get_extra_bufts")
        if not address:
            return
        get_list = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
        array = get_list(device)
        if not array:
            return
        i = 0
        while array[i]:
            self.original.append((base.ggml_backend_buft_name(array[i]).decode(), array[i]))
            i += 1
        self._array = array

    def names(self) -> list[str]:
        """The buffer types the next model load will consider, in order."""
        if self._array is None:
            return []
        by_pointer = {pointer: name for name, pointer in self.original}
        names, i = [], 0
        while self._array[i]:
            names.append(by_pointer.get(self._array[i], "?"))
            i += 1
        return names

    def use(self, names: set[str]) -> None:
        """Offer the loader only these of the original entries (in their original order)."""
        if self._array is None:
            return
        kept = [pointer for name, pointer in self.original if name in names]
        for i in range(len(self.original) + 1):
            self._array[i] = kept[i] if i < len(kept) else None


def _library(name: str) -> ctypes.CDLL:
    """One of the ggml libraries llama-cpp-python ships (already loaded by the process: the same one)."""
    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    return load_shared_library(name, Path(llama_cpp.__file__).parent / "lib")


_extra: _ExtraBuffers | None = None


def extra_buffers() -> _ExtraBuffers:
    global _extra
    if _extra is None:
        _extra = _ExtraBuffers()
    return _extra


# --- what runs ----------------------------------------------------------------------------------


def features() -> list[str]:
    """The CPU features this llama.cpp build uses (from `llama_print_system_info`: `AVX2 = 1 | …`)."""
    import llama_cpp

    return parse_features(llama_cpp.llama_print_system_info().decode(errors="replace"))


def parse_features(info: str) -> list[str]:
    """"CPU : NEON = 1 | SVE_CNT = 32 | …" -> ["NEON", "SVE_CNT=32", …]: a name for each flag that
    is on, NAME=VALUE where the value is a number that matters (the SVE vector length)."""
    found = []
    for part in info.split("|"):
        name, _, value = (p.strip() for p in part.partition("="))
        name = name.removeprefix("CPU :").strip()
        if name and value not in ("", "0"):
            found.append(name if value == "1" else f"{name}={value}")
    return found


# --- the AMX decision ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    use_amx: bool
    reason: str


def decide(*, amx_available: bool, amx_weights: list[str], setting: str, verdict: Callable[[], dict],
           build_flaw: Callable[[], str | None] = lambda: None) -> Decision:
    """Whether to offer AMX to the loader; `verdict()` is called (to read the cache or probe) only
    when it would change the answer. A build with a known flaw (`build_flaw()`: its tile kernel
    loads stack garbage as the tile shapes) is never offered AMX, and not probed: a probe that
    passes there was lucky — on the GCC 12.2 build a Q6_K probe model decoded right, and the demo
    model at Q6_K then crashed in `ggml_backend_amx_mul_mat` (2026-12-07)."""
    if not amx_available:
        return Decision(False, "this CPU or llama.cpp build has no AMX")
    if setting == "on":
        return Decision(True, f"{SETTING_ENV}=on")
    if setting == "off":
        return Decision(False, f"{SETTING_ENV}=off")
    if not amx_weights:
        return Decision(False, "no weights of a type AMX runs (it takes Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS)")
    flaw = build_flaw()
    if flaw:
        return Decision(False, f"{flaw}; {SETTING_ENV}=on forces it")
    v = verdict()
    if v["verdict"] == "ok":
        return Decision(True, f"a probe on this CPU decoded {'/'.join(amx_weights)} with AMX correctly")
    return Decision(False, f"a probe on this CPU found AMX broken ({v['detail']}); {SETTING_ENV}=on forces it")


# GCC 12.2's amxtileintrin.h (Debian 12's compiler) gives ldtilecfg's 64-byte operand as 8 bytes,
# `"m" (*((const void **)__config))`, so at -O2 the stores of the tile shapes in llama.cpp's
# ggml_tile_config_init (ggml-cpu/amx/mmq.cpp) are dropped as dead and ldtilecfg loads stack
# garbage: a general-protection fault, seen as SIGSEGV, at the first AMX matrix product. Read off
# the disassembly of the pinned build; clang compiles the same code right. (GCC 13's header calls
# a builtin instead.) Only 12.2 is named: no other version was looked at.
_FLAWED_GCC = re.compile(rb"GCC: \([^)\n]{0,80}\) (12\.2\.\d+)")


@functools.cache  # (read once per library: every AMX decision asks, and the library is megabytes)
def amx_build_flaw(library: Path) -> str | None:
    """Why the AMX kernels of this ggml CPU library cannot work, when its ELF `.comment` (the
    compilers that built it) names a GCC with the flawed AMX header; else None."""
    try:
        found = _FLAWED_GCC.search(library.read_bytes())
    except OSError:
        return None
    if found is None:
        return None
    return (f"llama.cpp was compiled by GCC {found.group(1).decode()}, whose AMX header lets the compiler drop "
            f"the tile shapes AMX loads; built with clang, AMX runs (see docs/cpu-and-memory.md, 'AMX')")


def setting_from_env(environ=os.environ) -> str:
    value = environ.get(SETTING_ENV, "auto").strip().lower() or "auto"
    return value if value in SETTINGS else "auto"


VERDICTS = "amx-verdicts.json"


def verdict_key(amx_weights: list[str]) -> str:
    """A verdict holds for one CPU model, one llama.cpp build (its CPU library) and one set of types."""
    return remembered.build_key(cpu_library(), ",".join(sorted(amx_weights)),
                                f"probe {PROBE_TOKENS}+{PROBE_SINGLE_TOKENS}").hexdigest()[:32]


def cached_or_probed_verdict(model_path: str, amx_weights: list[str], probe: Callable[[str], dict] | None = None) -> dict:
    """The cached verdict for this CPU/build/types, else a fresh probe's (then cached)."""
    key = verdict_key(amx_weights)
    known = remembered.recall(VERDICTS, key)
    if known is not None:
        return known
    result = (probe or probe_in_child)(model_path)
    if result is NOT_PROBED_YET:
        return result  # (a stand-in, not a verdict: nothing to cache)
    result = {**result, "types": sorted(amx_weights), "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    remembered.remember(VERDICTS, key, result)
    return result


# What the memory estimate assumes before the first probe of a CPU, build and weight types: that
# AMX works, so that the copy it would make is counted (the probe itself runs at the load, after
# the estimate has said the model fits).
NOT_PROBED_YET = {"verdict": "ok", "detail": "not probed yet"}


def cpu_library() -> Path:
    """The llama.cpp CPU library this process runs (what a build is known by)."""
    return Path(_library("ggml-cpu")._name)


def amx_decision(model_path, *, probe: bool = True) -> Decision:
    """Whether this model's weights get AMX (probing once per CPU, build and weight types; with
    `probe` False, a verdict not cached yet is NOT_PROBED_YET). The memory estimate asks before
    loading (AMX copies the weights it takes), without probing; `place_weights` acts on it."""
    from .modelfile import read_model_file

    available = [name for name, _ in extra_buffers().original]
    amx_weights = []
    if AMX in available:  # elsewhere there is nothing to decide, and the header need not be read
        types = [t.ggml_type for t in read_model_file(model_path).tensors]
        amx_weights = sorted({AMX_TYPES[t] for t in types if t in AMX_TYPES})
    return decide(amx_available=AMX in available, amx_weights=amx_weights, setting=setting_from_env(),
                  verdict=lambda: cached_or_probed_verdict(str(model_path), amx_weights,
                                                           None if probe else lambda _: NOT_PROBED_YET),
                  build_flaw=lambda: amx_build_flaw(cpu_library()))


def amx_would_run(ggml_types) -> bool:
    """Whether weights of these ggml types would get AMX here, as far as is known without probing (a
    verdict not cached yet counts AMX as working, as the decoder's estimate before loading does): for
    estimating a file before it exists (a profile not converted yet)."""
    available = [name for name, _ in extra_buffers().original]
    if AMX not in available:
        return False
    amx_weights = sorted({AMX_TYPES[t] for t in ggml_types if t in AMX_TYPES})
    return decide(amx_available=True, amx_weights=amx_weights, setting=setting_from_env(),
                  verdict=lambda: cached_or_probed_verdict("", amx_weights, lambda _: NOT_PROBED_YET),
                  build_flaw=lambda: amx_build_flaw(cpu_library())).use_amx


def place_weights(model_path) -> Decision:
    """Decide AMX for this model and set the loader's buffer types accordingly (before loading)."""
    extra = extra_buffers()
    available = {name for name, _ in extra.original}
    decision = amx_decision(model_path)
    extra.use(available if decision.use_amx else available - {AMX})
    return decision


# --- the probe ----------------------------------------------------------------------------------

# A prompt-sized batch, then single tokens: llama.cpp's AMX code has a kernel for each (tiles for
# batches, VNNI for a few rows), and the GCC 12.2 build crashed in the batch kernel on a model whose
# 8-token probe had passed (the demo model at Q6_K, 2026-12-06). Part of the verdict's key.
PROBE_TOKENS = 64
PROBE_SINGLE_TOKENS = 2
# Same weights, same activations: the two paths differ only in kernels and accumulation order.
# Broken kernels give garbage (cosine near 0) or NaN, not 0.999. The argmax is not compared: a
# random-weight model (the demo's) has near-ties that a last-bit difference flips.
MIN_COSINE = 0.995


def probe_in_child(model_path: str, buffer_type: str = AMX, timeout: float | None = None) -> dict:
    """Run `python -m qwen35.runtime.engine.amx_probe` on the model and read its verdict. The child may
    die (that is what it is for): its death is the verdict."""
    if timeout is None:
        size_gb = Path(model_path).stat().st_size / 1e9
        timeout = 120 + 60 * size_gb  # two loads (AMX repacks the weights) and two short decodes
    command = [sys.executable, "-m", "qwen35.runtime.engine.amx_probe", str(model_path), buffer_type]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"verdict": "broken", "detail": f"the probe did not finish in {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode < 0:
        return {"verdict": "broken", "detail": f"decoding with {buffer_type} killed the process (signal {-done.returncode})"}
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"verdict": "broken", "detail": f"the probe failed (exit {done.returncode}: {last[:200]})"}
    return json.loads(lines[-1])
