"""The thread governor against a simulated 2-core machine (per-token times as measured on this
project's machines: 2 threads 0.050 s quiet; with one busy process 0.233 s with 2 threads, 0.088 s
with 1), with a fake clock, a fake /proc/stat idle counter and a fake count of this process's CPU time."""

from __future__ import annotations

import pytest

from qwen35.runtime.engine.adaptive_threads import MAX_WAIT, MIN_GAP_S, ThreadGovernor, idle_core_seconds


class Machine:
    CORES = 2

    def __init__(self) -> None:
        self.busy = 0  # cores other programs keep busy
        self.now = 0.0
        self.idle = 0.0
        self.own = 0.0  # CPU seconds of our threads
        self.threads = 2

    def token_time(self) -> float:
        if self.busy == 0:
            return {1: 0.085, 2: 0.050}[self.threads]
        return {1: 0.088, 2: 0.233}[self.threads]

    def step(self, governor: ThreadGovernor) -> float:
        t = self.token_time()
        self.now += t
        # llama.cpp's threads spin while they wait: a core is idle only if nobody runs on it.
        self.idle += max(0, self.CORES - self.threads - self.busy) * t
        # More runnable threads than cores: the scheduler shares the cores out evenly.
        self.own += self.threads * min(1.0, self.CORES / (self.threads + self.busy)) * t
        governor.token_done(t)
        return t


def governed(machine: Machine) -> ThreadGovernor:
    def apply(n):
        machine.threads = n
    return ThreadGovernor(2, apply, idle=lambda: machine.idle, clock=lambda: machine.now,
                          own_cpu=lambda: machine.own, cores=machine.CORES)


def run(machine, governor, tokens):
    return sum(machine.step(governor) for _ in range(tokens))


def busy_after_quiet(busy_tokens: int) -> tuple[Machine, ThreadGovernor]:
    """40 quiet tokens, then `busy_tokens` with another program holding a core."""
    m = Machine()
    g = governed(m)
    run(m, g, 40)
    m.busy = 1
    run(m, g, busy_tokens)
    return m, g


def test_a_quiet_machine_is_never_made_to_try_fewer_threads():
    m = Machine()
    g = governed(m)
    elapsed = run(m, g, 1000)
    assert g.changes == [] and m.threads == 2
    assert elapsed == pytest.approx(1000 * 0.050)  # every token at 2 threads' speed


def test_programs_on_the_cores_our_threads_leave_free_start_no_try():
    """2 threads on 4 cores, two other programs on the other two: nothing one thread fewer could
    give back, so nothing is tried; a third program takes one of our cores: then it is."""
    m = Machine()
    m.CORES, m.busy = 4, 2
    m.token_time = lambda: 0.050 if m.busy + m.threads <= m.CORES else {1: 0.088, 2: 0.233}[m.threads]
    g = governed(m)
    run(m, g, 200)
    assert g.changes == []
    m.busy = 3
    run(m, g, 8)
    assert g.changes == [1] and m.threads == 1


def test_busy_from_the_start_is_noticed():
    m = Machine()
    m.busy = 1
    g = governed(m)
    elapsed = run(m, g, 500)
    assert m.threads == 1 and g.changes == [1]
    assert 500 * 0.088 / elapsed >= 0.95


def test_busy_core_drops_a_thread_and_keeps_it():
    m = Machine()
    g = governed(m)
    run(m, g, 40)
    m.busy = 1
    elapsed = run(m, g, 500)
    assert m.threads == 1
    # Nearly all tokens at the best fixed count's speed: one slow window to notice, no probing up
    # while no core is idle.
    assert 500 * 0.088 / elapsed >= 0.95
    assert g.changes == [1]


def test_back_to_all_threads_when_the_machine_frees():
    m, g = busy_after_quiet(200)
    m.busy = 0
    run(m, g, 40)
    assert m.threads == 2 and g.changes == [1, 2]


def test_a_slow_phase_that_fewer_threads_do_not_help_backs_off():
    """Slower while another program runs, but for another reason too (say, memory bandwidth):
    fewer threads are no faster, so the governor goes back, and waits ever longer between tries."""
    m = Machine()
    g = governed(m)
    run(m, g, 40)
    m.busy = 1
    m.token_time = lambda: 0.2 if m.threads == 2 else 0.4
    run(m, g, 2000)
    assert m.threads == 2
    tries = g.changes.count(1)
    assert 2 <= tries <= 8  # 16, 32, 64, … tokens apart


def test_a_slow_phase_on_a_quiet_machine_tries_nothing():
    """1.6x slower with no other program on the cores (the VM's neighbours, memory): one thread
    fewer cannot cure it, and no try is made."""
    m = Machine()
    g = governed(m)
    run(m, g, 40)
    m.token_time = lambda: 0.080 if m.threads == 2 else 0.160
    run(m, g, 2000)
    assert g.changes == []


def test_cores_taken_where_proc_stat_does_not_show_it_are_given_back_when_tokens_crawl():
    """A CPU quota (or a host's load outside the CPUs /proc/stat lists for us) takes a core that
    the busy time does not show: tokens 4.7x slower are reason enough to try a thread fewer."""
    class Unseen(Machine):
        def step(self, governor):  # the cores look like ours all the time
            t = self.token_time()
            self.now, self.own = self.now + t, self.own + self.threads * t
            governor.token_done(t)
            return t

    m = Unseen()
    g = governed(m)
    run(m, g, 40)
    m.busy = 1
    run(m, g, 100)
    assert g.changes == [1] and m.threads == 1


def test_a_probe_under_way_when_a_reply_ends_does_not_reach_the_next_prompt():
    m = Machine()
    m.busy = 1
    g = governed(m)
    run(m, g, 4)  # the first window: another program holds a core, so a try at a thread fewer starts
    assert m.threads == 1
    g.reply_ended()
    assert m.threads == 2 and g.changes == [1, 2]
    run(m, g, 3)
    g.reply_ended()  # tokens of two replies never make one window
    run(m, g, 3)
    assert g.changes == [1, 2]


def pause(machine: Machine, seconds: float) -> None:
    """Between replies: nothing of ours runs, other programs keep their cores."""
    machine.now += seconds
    machine.idle += (machine.CORES - machine.busy) * seconds


def test_a_prompt_after_the_cores_freed_between_replies_starts_on_every_thread():
    m, g = busy_after_quiet(40)
    assert m.threads == 1
    g.reply_ended()
    m.busy = 0
    pause(m, 1.0)
    g.prompt_starting()
    assert m.threads == 2
    run(m, g, 100)  # and it stays there while the machine is quiet
    assert m.threads == 2


def test_a_prompt_while_the_cores_stay_taken_keeps_fewer_threads():
    m, g = busy_after_quiet(40)
    for gap in (1.0, MIN_GAP_S / 10):  # taken all along; a pause too short to tell
        g.reply_ended()
        if gap < MIN_GAP_S:
            m.busy = 0
        pause(m, gap)
        g.prompt_starting()
        assert m.threads == 1, gap


def test_one_slow_window_does_not_make_it_keep_fewer_threads():
    """A hiccup (a page fault storm while another program starts) makes one 2-thread window twice
    as slow: the probe at 1 thread that follows is faster than that window, but not by what a busy
    core would give."""
    m = Machine()
    g = governed(m)
    run(m, g, 40)
    quiet = m.token_time
    m.token_time = lambda: 0.100
    m.busy = 1
    run(m, g, 4)
    m.token_time = quiet
    m.busy = 0
    run(m, g, 4)  # the probe's window, judged at its end
    assert m.threads == 2 and g.changes == [1, 2]


def test_jitter_starts_no_probe_where_the_second_thread_gains_little():
    """A memory-bound decode (2 threads 0.050 s, 1 thread 0.057 s) on a quiet VM where every third
    window is 25 % slower: no window is slow enough that a thread fewer could be kept, so none is
    tried (each try costs a window of slower tokens)."""
    m = Machine()
    tokens = iter(range(10**6))
    m.token_time = lambda: {1: 0.057, 2: 0.050}[m.threads] * (1.25 if next(tokens) // 4 % 3 == 2 else 1.0)
    g = governed(m)
    run(m, g, 1000)
    assert g.changes == [] and m.threads == 2


def test_without_proc_stat_it_tries_a_thread_fewer_once():
    """Where other programs' use of the cores cannot be seen, a machine busy from the start is
    found by trying: once, after the first window."""
    m = Machine()
    g = ThreadGovernor(2, lambda n: setattr(m, "threads", n), idle=lambda: None, clock=lambda: m.now)
    run(m, g, 1000)
    assert g.changes == [1, 2] and m.threads == 2


def test_without_proc_stat_it_still_probes_up_now_and_then():
    m = Machine()
    g = ThreadGovernor(2, lambda n: setattr(m, "threads", n), idle=lambda: None, clock=lambda: m.now)
    run(m, g, 40)
    m.busy = 1
    run(m, g, 200)
    m.busy = 0
    run(m, g, MAX_WAIT)
    assert m.threads == 2


def test_idle_core_seconds_reads_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 200 0 0 0 0 0\ncpu0 50 0 25 500 100 0 0 0 0 0\n")
    import os
    assert idle_core_seconds(stat) == 1200 / os.sysconf("SC_CLK_TCK")
    assert idle_core_seconds(stat, cpus=frozenset({0})) == 600 / os.sysconf("SC_CLK_TCK")  # our cpuset's lines
    assert idle_core_seconds(stat, cpus=frozenset({0, 5})) is None  # a CPU it does not list
    assert idle_core_seconds(tmp_path / "missing") is None


def test_run_and_serve_adapt_threads_unless_told_to_keep_them_fixed(monkeypatch):
    """The CLI hands the session its thread policy: adapting by default, fixed with --fixed-threads."""
    from click.testing import CliRunner

    import qwen35.runtime.frontends.run as run_module
    import qwen35.runtime.frontends.server as server_module
    from qwen35.cli import main

    seen = []
    monkeypatch.setattr(run_module, "run", lambda model, session_options, **kw: seen.append(session_options) or 0)
    monkeypatch.setattr(server_module, "serve", lambda model, session_options, **kw: seen.append(session_options))
    runner = CliRunner()
    for args in (["run", "m.gguf", "-p", "hi"], ["run", "m.gguf", "-p", "hi", "--fixed-threads"],
                 ["serve", "m.gguf"], ["serve", "m.gguf", "--fixed-threads"]):
        assert runner.invoke(main, args).exit_code == 0
    assert [options["adapt_threads"] for options in seen] == [True, False, True, False]
