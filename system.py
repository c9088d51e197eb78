"""What the machine offers: CPU cores (and which of them are fast), available RAM, this process's memory;
and a thread's priority.

Shared by the converter (its quantizing threads) and the runtime; it imports nothing of qwen35.

The CPU topology is read from Linux's sysfs (`/sys/devices/system/cpu`), under a root that tests
replace with a fake tree: `cpuN/topology/core_cpus_list` (older kernels: `thread_siblings_list`)
says which logical CPUs are hyper-threads of one core (not `core_id`: on ARM boards it restarts at 0
in each cluster), `cpuN/cpu_capacity` (the scheduler's relative speed, 1024 = fastest; ARM
and recent x86 kernels) or else `cpuN/cpufreq/cpuinfo_max_freq` says which cores are the fast ones
on a CPU that mixes core types (RK3588: 4 Cortex-A76 + 4 Cortex-A55; Intel P- and E-cores).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

# Cores within this fraction of the fastest core's capacity count as performance cores. Binned
# cores of one type differ by < 10% (RK3588's two A76 pairs: 2.4 vs 2.256 GHz); a little core is
# ≥ 20% slower (A55 at 1.8 GHz vs A76 at 2.4: 0.75 by frequency, 0.52 by capacity; Intel E-cores
# 0.74-0.8 of the P-cores' turbo frequency).
PERFORMANCE_FRACTION = 0.85


@dataclass(frozen=True)
class Cpu:
    id: int
    core: tuple[int, ...]  # the logical CPUs of its physical core (more than one: hyper-threads)
    capacity: int | None  # cpu_capacity, else the maximum frequency in kHz; None if neither is known


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_list(text: str) -> list[int]:
    """'0-3,6,8-9' -> [0, 1, 2, 3, 6, 8, 9] (the kernel's cpulist format)."""
    cpus = []
    for part in text.split(","):
        if part.strip():
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def usable_cpus() -> frozenset[int] | None:
    """The CPUs this process may run on (a container's or `taskset`'s cpuset), None where unknown."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def read_cpus(root: str | Path = "/", allowed: set[int] | None = None) -> list[Cpu]:
    """The online logical CPUs this process may run on (`allowed`: default, its affinity)."""
    base = Path(root) / "sys/devices/system/cpu"
    online = _read(base / "online")
    ids = _cpu_list(online) if online else sorted(
        int(p.name[3:]) for p in base.glob("cpu[0-9]*") if p.name[3:].isdigit())
    if allowed is None and Path(root) == Path("/"):
        allowed = usable_cpus()
    if allowed is not None:
        ids = [i for i in ids if i in allowed]
    by_capacity = all(_read(base / f"cpu{i}/cpu_capacity") for i in ids)
    cpus = []
    for i in ids:
        d = base / f"cpu{i}"
        raw = _read(d / "cpu_capacity") if by_capacity else _read(d / "cpufreq/cpuinfo_max_freq")
        siblings = _read(d / "topology/core_cpus_list") or _read(d / "topology/thread_siblings_list")
        core = tuple(_cpu_list(siblings)) if siblings else (i,)
        cpus.append(Cpu(i, core, int(raw) if raw and raw.isdigit() else None))
    return cpus


def _fallback_count() -> int:
    allowed = usable_cpus() or range(os.cpu_count() or 1)
    return max(1, len(allowed))


def physical_cores(root: str | Path = "/", allowed: set[int] | None = None) -> int:
    """Physical cores this process may run on (hyper-threads share a core's compute units, and
    llama.cpp generation gets slower, not faster, when it runs a thread on each of them)."""
    cpus = read_cpus(root, allowed)
    return len({c.core for c in cpus}) if cpus else _fallback_count()


def performance_cores(root: str | Path = "/", allowed: set[int] | None = None) -> int:
    """Physical cores of the fastest kind: the default thread count for generation. llama.cpp splits
    each matrix evenly over its threads and waits for the slowest, so a thread on a little core
    holds the big ones back; on a CPU of one core type this is physical_cores()."""
    cpus = read_cpus(root, allowed)
    if not cpus:
        return _fallback_count()
    known = [c.capacity for c in cpus if c.capacity]
    if len(known) == len(cpus):
        fastest = max(known)
        cpus = [c for c in cpus if c.capacity >= PERFORMANCE_FRACTION * fastest]
    return len({c.core for c in cpus})


def available_ram() -> int:
    """Bytes the kernel could give us without swapping (MemAvailable counts reclaimable page cache,
    which is where a memory-mapped model file lives)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """Resident memory of this process now, in bytes."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()
