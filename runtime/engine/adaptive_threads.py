"""Generation threads that give way when other programs take cores, and come back when they leave.

llama.cpp splits each token's matrix products evenly over its threads and waits for all of them;
when another program holds one of the cores, one thread runs late every step and the others spin
waiting for it (measured on 2 cores with one `yes > /dev/null`: 4.3 tokens/s with 2 threads, 11.3
with 1, 20.2 quiet with 2). So between tokens this watches the time per token:

- at each thread count it keeps the best time it has seen (the quiet baseline of that count);
- it tries one thread fewer only after a window in which other programs took cores from ours (the
  machine's busy time, from /proc/stat, less this process's CPU time: TAKEN), and then when tokens
  take SLOWER × that baseline, or so long that one thread fewer has been seen to beat them by what
  a kept probe must (BETTER), or when one thread fewer was never tried — so a machine busy from the
  start is noticed too. It tries for a window of tokens and keeps it if it is that much faster
  (else it goes back and waits longer before trying again). A quiet machine is never made to try:
  a slower window there is the VM's jitter, which fewer threads do not cure (each try costs a
  window of slower tokens: ~7 % of a 64-token reply at 4B on 2 cores); only tokens MUCH_SLOWER than
  the baseline are tried without it (what takes our cores may not show in /proc/stat). Where
  /proc/stat cannot be read, the times alone decide, and it tries one thread fewer once per session;
- below the maximum, it tries one thread more when the machine has an idle core again (from
  /proc/stat), or every so often where that cannot be read, and keeps it if it is faster;
- a reply ending mid-probe ends the probe (`reply_ended`): the next prompt is evaluated on the
  threads the governor trusts, and windows never mix the tokens of two replies;
- below the maximum, a prompt starts on every thread again when other programs left the cores
  idle while nothing of ours ran, since the last reply ended (`prompt_starting`): a prompt on one
  thread of two takes twice as long, and the next reply would otherwise wait FIRST_WAIT tokens.

Quiet, nothing changes: the baseline holds and no probe runs.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

from ...system import usable_cpus

WINDOW = 4  # tokens per measurement
SLOWER = 1.3  # a window this much slower than the quiet baseline means cores are taken
# A probe is kept if it is at least this much faster than what it replaced. Quiet, windows of one
# count differ by up to ~30 % on a shared VM; a count that really helps helps by far more (one
# busy core on 2: 0.38x the time per token with a thread fewer; freed again: 0.59x with one more).
BETTER = 0.8
FIRST_WAIT, MAX_WAIT = 16, 1024  # tokens before the next probe in a direction; doubles after each failure
# Cores other programs must have taken from our threads, on average over a window, before one thread
# fewer is tried (a `yes` beside 2 threads on 2 cores: ~0.67; quiet: below 0.1, /proc/stat counting
# in 10 ms ticks). A slower window without it is the VM's jitter or memory, which fewer threads do
# not cure. The hypervisor's own use of our cores shows as steal time, which counts as taken.
TAKEN = 0.3
# Tokens this much slower than the baseline are tried on a thread fewer whatever /proc/stat says:
# what takes our cores may not show there (a cgroup's CPU quota; a host's load outside our cpuset
# lines). Quiet jitter stays below it; one busy core on 2 makes tokens 4.7x slower.
MUCH_SLOWER = 2.0
MIN_GAP_S = 0.1  # a pause between replies shorter than this says too little about the cores


def idle_core_seconds(stat: Path = Path("/proc/stat"), cpus: Optional[frozenset[int]] = None) -> Optional[float]:
    """Idle time since boot, in seconds, summed over `cpus` (default: every CPU); None where
    /proc/stat is missing. Counting only the CPUs we may run on keeps a big host's other CPUs,
    idle or busy, out of what the governor reads of ours."""
    try:
        lines = stat.read_text().splitlines()
        rows = [line.split() for line in lines if line.startswith("cpu")]
        if cpus is None:
            rows = rows[:1]  # the "cpu" line: all of them
        else:
            rows = [r for r in rows[1:] if int(r[0][3:]) in cpus]
            if len(rows) != len(cpus):
                return None
        return sum(int(r[4]) + int(r[5]) for r in rows) / os.sysconf("SC_CLK_TCK")  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None


class ThreadGovernor:
    """Call `token_done(seconds)` after each generated token; it calls `apply(n)` to change threads."""

    def __init__(self, max_threads: int, apply: Callable[[int], None], *,
                 idle: Optional[Callable[[], Optional[float]]] = None,
                 clock: Callable[[], float] = time.monotonic, own_cpu: Callable[[], float] = time.process_time,
                 cores: Optional[int] = None) -> None:
        self.max_threads = max_threads
        self.threads = max_threads
        if idle is None:
            cpus = usable_cpus()
            idle, cores = (lambda: idle_core_seconds(cpus=cpus)), cores or (len(cpus) if cpus else None)
        self._apply, self._idle, self._clock, self._own_cpu = apply, idle, clock, own_cpu
        self._cores = cores or os.cpu_count() or max_threads
        self._ended: Optional[tuple[float, Optional[float]]] = None  # (clock, idle) when the last reply ended
        self.quiet: dict[int, float] = {}  # threads -> best window median seen
        self._window: list[float] = []
        self._probe: Optional[tuple[int, float]] = None  # (threads before, their median) while probing
        self._wait = {-1: 0, +1: FIRST_WAIT}
        self._since = {-1: 0, +1: 0}
        self._mark = self._now()
        self.changes: list[int] = []  # thread counts applied, in order (for benches and tests)

    def token_done(self, seconds: float) -> None:
        self._window.append(seconds)
        if len(self._window) < WINDOW:
            return
        median = statistics.median(self._window)
        self._window = []
        idle_cores, others = self._cores_since_mark()
        self.quiet[self.threads] = min(self.quiet.get(self.threads, median), median)
        for direction in self._since:
            self._since[direction] += WINDOW
        if self._probe:
            self._judge_probe(median)
        elif self.threads > 1 and self._since[-1] >= self._wait[-1] and (
                median > MUCH_SLOWER * self.quiet[self.threads]
                or (others is None or others >= TAKEN) and (
                    median > SLOWER * self.quiet[self.threads]
                    or BETTER * median > self.quiet.get(self.threads - 1, float("inf"))
                    or self.threads - 1 not in self.quiet)):
            self._start_probe(-1, median)
        elif self.threads < self.max_threads and self._since[+1] >= self._wait[+1] and (
                idle_cores is None or idle_cores >= 0.5 or self._wait[+1] >= MAX_WAIT):
            self._start_probe(+1, median)

    def reply_ended(self) -> None:
        """A reply is over: a probe under way goes back to the threads it was trying to beat, so
        the next prompt (or the prefill) runs on threads the governor trusts, and the partial
        window is dropped (a window is never judged across a prompt)."""
        self._window = []
        if self._probe:
            before, _ = self._probe
            self._probe = None
            self._set(before)
        self._ended = (self._clock(), self._idle())

    def prompt_starting(self) -> None:
        """A prompt is about to be evaluated. Below the maximum, if the cores stayed idle since the
        last reply ended (less than half a core busy: nothing of ours ran meanwhile), go back to
        every thread now and watch afresh."""
        ended, self._ended = self._ended, None
        if self.threads >= self.max_threads or ended is None:
            return
        (then, idle_then), now, idle = ended, self._clock(), self._idle()
        if idle is None or idle_then is None or now - then < MIN_GAP_S:
            return
        if self._cores - (idle - idle_then) / (now - then) < 0.5:
            self._set(self.max_threads)
            self._wait, self._since = {-1: 0, +1: FIRST_WAIT}, {-1: 0, +1: 0}

    def _start_probe(self, direction: int, median: float) -> None:
        self._probe = (self.threads, median)
        self._set(self.threads + direction)

    def _judge_probe(self, median: float) -> None:
        before, before_median = self._probe
        self._probe = None
        direction = 1 if self.threads > before else -1
        self._since = {-1: 0, +1: 0}
        if median < BETTER * before_median:
            self._wait = {-1: 0, +1: FIRST_WAIT}  # kept: watch both ways afresh
        else:
            self._set(before)
            self._wait[direction] = min(max(2 * self._wait[direction], FIRST_WAIT), MAX_WAIT)

    def _set(self, threads: int) -> None:
        self.threads = threads
        self.changes.append(threads)
        self._apply(threads)
        self._mark = self._now()

    def _now(self) -> tuple[float, Optional[float], float]:
        return self._clock(), self._idle(), self._own_cpu()

    def _cores_since_mark(self) -> tuple[Optional[float], Optional[float]]:
        """Since the last window, on average: the cores idle (other programs' and ours counted
        alike), and the cores other programs took beyond those our threads leave them (what one
        thread fewer could give back); None where /proc/stat cannot be read."""
        now = self._now()
        (then, idle_then, own_then), self._mark = self._mark, now
        if now[1] is None or idle_then is None or now[0] <= then:
            return None, None
        span = now[0] - then
        idle, own = (now[1] - idle_then) / span, (now[2] - own_then) / span
        return idle, self._cores - idle - own - (self._cores - self.threads)
