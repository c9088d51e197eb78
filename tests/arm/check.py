"""The chat runtime on emulated aarch64: llama.cpp cross-built from the pinned sdist for a Pi 5
(armv8.2-a+dotprod, run as a Cortex-A76) and a Pi 4 (armv8-a, run as a Cortex-A72), Debian's arm64
Python, qemu-user. For an edge-arm (Q4_0) and a Q4_K_M file of the demo model, on each target:

- one-shot `qwen35 run` answers; llama.cpp's load log names exactly the repacked layouts our
  predicate (runtime/repack.py) gives every tensor; the A76 build repacks, the A72 build does not;
- logits of a fixed prompt agree with native x86's: cosine ≥ 0.9995 and max |Δ| ≤ 0.05. The two
  sides run different kernels (x86 AVX2 repacks Q4_K as 8x8, the A76 as 8x4, the A72 not at all),
  which round differently: measured here up to 1.9e-2 (cosine 0.99987) for Q4_K_M, ~1e-7 for the
  Q4_0 file; the 4-bit quantization error itself is ~0.28, fifteen times more;
- multi-turn: later turns reuse the state (checkpoints), the context is the template's rendering;
  save/load resumes to the same greedy reply without re-evaluating;
- memory: the estimate (what loading adds) against what the guest's own mappings gained, read
  from qemu's /proc/<pid>/smaps over the ranges the guest's /proc/self/maps lists (qemu emulates
  that file with the guest's mappings only), so qemu's translation cache, heap and binary are left
  out; within 10% on the A76.

    .venv/bin/python tests/arm/check.py      (first run: ~5 min of building, cached in ~/.cache/qwen35-arm)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
import toolchain  # noqa: E402

COSINE_MIN, MAX_ABS_DIFF, MEMORY_TOLERANCE = 0.9995, 0.05, 0.10
FILES = ["edge-arm", "q4_k_m"]
CHAT_TIMEOUT_S = 1800  # one emulated chat takes a few minutes; a hang is ended here


def guest_env(paths: dict, target: str) -> dict:
    # PYTHONPATH only for the guest's commands: exported globally it would drag the aarch64 numpy
    # into the x86 Python.
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
            "QEMU_LD_PREFIX": str(paths["sysroot"]), "QEMU_CPU": toolchain.TARGETS[target],
            "PYTHONPATH": os.pathsep.join(str(p) for p in (paths["pkgroot"], paths["llama_cpp"][target],
                                                             paths["wheels"])),
            "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(toolchain.CACHE / "home")}


def guest_cmd(paths: dict, *args) -> list[str]:
    return ["qemu-aarch64", str(paths["sysroot"] / "usr/bin/python3.11"), *map(str, args)]


def mapped_rss(pid: int, guest_maps: str) -> int:
    """Resident bytes of the qemu process's mappings that are the guest's (host address = guest
    address: qemu-user runs a 64-bit guest with guest_base 0 here, checked by the exact match)."""
    guest = set()
    for line in guest_maps.splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        guest.add((start, end))
    total, matched, current = 0, set(), None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            current = (int(head.group(1), 16), int(head.group(2), 16))
        elif line.startswith("Rss:") and current and any(s <= current[0] and current[1] <= e for s, e in guest):
            total += int(line.split()[1]) * 1024
            matched.add(current)
    if len(matched) < 0.5 * len(guest):
        raise SystemExit(f"the guest's mappings were not found in qemu's ({len(matched)} of {len(guest)}): "
                         "guest_base is not 0, this measurement does not apply")
    return total


def run_chat(paths: dict, target: str, model: Path, work: Path) -> tuple[dict, dict[str, int]]:
    proc = subprocess.Popen(guest_cmd(paths, HERE / "guest.py", "chat", model, work), env=guest_env(paths, target),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=work)
    rss, last = {}, ""
    # A deadline on the reading loop: a guest that hangs is killed, and that fails the check.
    watchdog = threading.Timer(CHAT_TIMEOUT_S, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("MEASURE "):
                label = line.split()[1]
                rss[label] = mapped_rss(proc.pid, (work / f"maps-{label}.txt").read_text())
                proc.stdin.write("\n")
                proc.stdin.flush()
            elif line.strip():
                last = line
    finally:
        watchdog.cancel()
    if proc.wait(60) != 0:
        raise AssertionError(f"guest chat exited with {proc.returncode}"
                             + (f" (killed: no end in {CHAT_TIMEOUT_S} s)" if proc.returncode == -9 else ""))
    return json.loads(last), rss


def check_one(paths: dict, target: str, qtype: str, model: Path, x86_logits: np.ndarray, work: Path) -> list[str]:
    failures = []
    env = guest_env(paths, target)
    a76 = toolchain.TARGETS[target] == "cortex-a76"

    start = time.perf_counter()
    one = subprocess.run(guest_cmd(paths, "-m", "qwen35.cli", "run", model, "-p", "hello", "--max-tokens", "8",
                                   "--temp", "0", "--no-think", "--verbose"), env=env, capture_output=True, text=True, cwd=work)
    if one.returncode != 0 or not one.stdout.strip():
        failures.append(f"one-shot run failed (exit {one.returncode}, stdout {one.stdout!r}): "
                        f"{one.stderr.strip().splitlines()[-1:]}")
    logged = dict(re.findall(r"repack: repack tensor (\S+) with (\S+)", one.stderr))

    result, rss = run_chat(paths, target, model, work)
    arm = np.load(work / "logits.npy")
    cos = float(arm @ x86_logits / (np.linalg.norm(arm) * np.linalg.norm(x86_logits)))
    diff = float(np.max(np.abs(arm - x86_logits)))
    if cos < COSINE_MIN or diff > MAX_ABS_DIFF:
        failures.append(f"logits differ from x86: cosine {cos:.6f}, max |Δ| {diff:.3g}")
    if result["predicted_repack"] != logged:
        failures.append(f"repack predicate disagrees with llama.cpp's log: predicted {len(result['predicted_repack'])} "
                        f"tensors, logged {len(logged)}")
    if a76 and not logged:
        failures.append("the A76 (dotprod) build repacked nothing")
    if not a76 and logged:
        failures.append("the A72 (armv8-a) build repacked weights")
    turns = result["turns"]
    if not all(t["cached_tokens"] > 0 for t in turns[1:]) or not all(t["context_is_rendering"] for t in turns):
        failures.append(f"multi-turn did not reuse the state: {turns}")
    if result["continued"] != result["resumed"] or result["resumed_cached_tokens"] <= 0:
        failures.append(f"save/load did not resume: {result['continued']!r} vs {result['resumed']!r}")
    grown = rss["after"] - rss["before"]
    estimated = result["estimate"]["to_load"]
    ratio = estimated / grown
    if a76 and abs(ratio - 1) > MEMORY_TOLERANCE:
        failures.append(f"memory estimate {estimated / 2**20:.1f} MiB vs measured {grown / 2**20:.1f} MiB")
    print(f"| {target} ({toolchain.TARGETS[target]}) | {qtype} | {len(logged)} ({', '.join(sorted(set(logged.values())))}) "
          f"| {cos:.6f} / {diff:.2e} | {turns[-1]['prompt_tokens']} new, {turns[-1]['cached_tokens']} reused "
          f"| {estimated / 2**20:.1f} / {grown / 2**20:.1f} MiB ({ratio:.3f}) "
          f"| {time.perf_counter() - start:.0f} s | {'ok' if not failures else 'FAIL'} |", flush=True)
    return failures


def main() -> int:
    from tests.test_runtime import build_tiny_gguf

    started = time.perf_counter()
    paths = toolchain.ensure_all()
    (toolchain.CACHE / "home").mkdir(exist_ok=True)
    toolchain.log(f"set up in {time.perf_counter() - started:.0f} s")
    models = {qtype: build_tiny_gguf(qtype) for qtype in FILES}
    failures = []
    with tempfile.TemporaryDirectory(prefix="qwen35-arm-") as tmp:
        print("| build (CPU) | file | repacked tensors | logits vs x86: cosine / max abs diff | last turn "
              "| memory estimate / measured | time | |")
        print("| --- | --- | --- | --- | --- | --- | ---: | --- |")
        for qtype, model in models.items():
            x86 = Path(tmp) / f"x86-{qtype}.npy"
            subprocess.run([sys.executable, HERE / "guest.py", "logits", model, x86], check=True, cwd=tmp)
            for target in toolchain.TARGETS:
                work = Path(tmp) / f"{target}-{qtype}"
                work.mkdir()
                for failure in check_one(paths, target, qtype, model, np.load(x86), work):
                    failures.append(f"{target} {qtype}: {failure}")
    for failure in failures:
        print(f"FAIL {failure}")
    toolchain.log(f"{'passed' if not failures else 'FAILED'} in {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
