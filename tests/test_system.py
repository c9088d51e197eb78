"""Thread defaults from the CPU topology, against fake sysfs trees of real machines."""

from __future__ import annotations

from pathlib import Path

from qwen35.system import performance_cores, physical_cores, read_cpus


def fake_sysfs(root: Path, cores: list[tuple[int, ...]], *, capacity: dict[int, int] | None = None,
               max_freq: dict[int, int] | None = None) -> Path:
    """A /sys/devices/system/cpu with one entry per logical CPU; `cores` lists the logical CPUs of
    each physical core (more than one: hyper-threads)."""
    base = root / "sys/devices/system/cpu"
    ids = sorted(i for core in cores for i in core)
    base.mkdir(parents=True)
    (base / "online").write_text(f"{ids[0]}-{ids[-1]}\n")
    for core in cores:
        siblings = ",".join(map(str, core))
        for i in core:
            topo = base / f"cpu{i}/topology"
            topo.mkdir(parents=True)
            (topo / "core_cpus_list").write_text(siblings + "\n")
            (topo / "core_id").write_text("0\n")  # as on ARM clusters: not unique, must not be used
            if capacity:
                (base / f"cpu{i}/cpu_capacity").write_text(f"{capacity[i]}\n")
            if max_freq:
                (base / f"cpu{i}/cpufreq").mkdir()
                (base / f"cpu{i}/cpufreq/cpuinfo_max_freq").write_text(f"{max_freq[i]}\n")
    return root


def test_pi5_four_a76(tmp_path):
    root = fake_sysfs(tmp_path, [(0,), (1,), (2,), (3,)], capacity={i: 1024 for i in range(4)},
                      max_freq={i: 2400000 for i in range(4)})
    assert physical_cores(root) == 4
    assert performance_cores(root) == 4


def test_rk3588_counts_the_a76_cores_by_capacity(tmp_path):
    # Four Cortex-A55 (capacity 414 after frequency scaling) and two A76 pairs, one binned lower.
    capacity = {0: 414, 1: 414, 2: 414, 3: 414, 4: 1024, 5: 1024, 6: 1001, 7: 1001}
    root = fake_sysfs(tmp_path, [(i,) for i in range(8)], capacity=capacity)
    assert physical_cores(root) == 8
    assert performance_cores(root) == 4


def test_rk3588_by_max_frequency_without_cpu_capacity(tmp_path):
    freq = {0: 1800000, 1: 1800000, 2: 1800000, 3: 1800000, 4: 2400000, 5: 2400000, 6: 2256000, 7: 2256000}
    root = fake_sysfs(tmp_path, [(i,) for i in range(8)], max_freq=freq)
    assert performance_cores(root) == 4


def test_x86_laptop_with_hyperthreads(tmp_path):
    # 4 cores × 2 threads, the kernel's numbering (sibling of cpu0 is cpu4), one core type.
    root = fake_sysfs(tmp_path, [(0, 4), (1, 5), (2, 6), (3, 7)], max_freq={i: 4200000 for i in range(8)})
    assert physical_cores(root) == 4
    assert performance_cores(root) == 4


def test_hybrid_x86_counts_hyperthreaded_p_cores_once(tmp_path):
    # 2 P-cores with hyper-threads (cpu0-3) and 4 E-cores (cpu4-7), max turbo 4.7 vs 3.5 GHz.
    freq = {0: 4700000, 1: 4700000, 2: 4700000, 3: 4700000, 4: 3500000, 5: 3500000, 6: 3500000, 7: 3500000}
    root = fake_sysfs(tmp_path, [(0, 1), (2, 3), (4,), (5,), (6,), (7,)], max_freq=freq)
    assert physical_cores(root) == 6
    assert performance_cores(root) == 2


def test_affinity_limits_the_count(tmp_path):
    capacity = {0: 414, 1: 414, 2: 414, 3: 414, 4: 1024, 5: 1024, 6: 1024, 7: 1024}
    root = fake_sysfs(tmp_path, [(i,) for i in range(8)], capacity=capacity)
    assert [c.id for c in read_cpus(root, allowed={0, 1, 4})] == [0, 1, 4]
    assert performance_cores(root, allowed={0, 1, 4}) == 1
    # Pinned to little cores only: those are the fastest it has.
    assert performance_cores(root, allowed={0, 1}) == 2


def test_unknown_speeds_count_every_core(tmp_path):
    root = fake_sysfs(tmp_path, [(0,), (1,), (2,)])
    assert performance_cores(root) == physical_cores(root) == 3


def test_this_machine_has_at_least_one_core():
    assert 1 <= performance_cores() <= physical_cores()
