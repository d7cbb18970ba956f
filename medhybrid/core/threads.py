"""CPU thread policy: training degrades gracefully when other processes share the cores.

PyTorch's CPU kernels run as OpenMP teams of ``torch.get_num_threads()`` threads, one per core by default. Every
operator ends in a barrier, so a team is as fast as its slowest thread: when another process takes one of two cores,
the team's thread on that core gets half of it, in scheduler time slices, while its partner spins at the barrier.
Fine-tuning then slows 3-4x instead of the 2x that losing a core should cost (``benchmarks/cpu_contention.py``).

:class:`ThreadPolicy` watches how many cores the *other* processes use (``/proc/stat`` minus this process's own
``/proc/self/stat``) and sizes the team to the cores left: one thread beside one busy process on two cores, all of
them again once it has gone. Results do not depend on the thread count beyond floating-point summation order.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from ignite.engine import Events

log = logging.getLogger("medhybrid")


def cores_available() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (``cpu.max``) when one is set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass
    return n


class OtherLoad:
    """Cores used by other processes since the last :meth:`sample` that measured (Linux ``/proc``; None elsewhere, or
    before ``min_window_s`` has passed: the counters tick every 10 ms)."""

    def __init__(self, min_window_s: float = 0.25):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.min_window_s = min_window_s
        self.last = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        """(machine busy ticks, this process's ticks, wall seconds)."""
        try:
            cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq, steal = (float(v) for v in (cpu + ["0"] * 8)[:8])
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            return user + nice + system + irq + softirq + steal, float(own[11]) + float(own[12]), time.monotonic()
        except (OSError, ValueError, IndexError):
            return None

    def sample(self) -> float | None:
        now = self._read()
        if now is None or self.last is None:
            self.last = now
            return None
        if now[2] - self.last[2] < self.min_window_s:
            return None
        busy, own, wall = (a - b for a, b in zip(now, self.last, strict=True))
        self.last = now
        return max(0.0, (busy - own) / self.tick / wall)


def threads_for(cores: int, others: float, most: int) -> int:
    """The team size for ``cores`` when other processes use ``others`` cores: the cores left, rounded, in [1, most].
    A process needs most of a core (0.75) to take it."""
    return max(1, min(most, cores - int(others + 0.25)))


class ThreadPolicy:
    """An Ignite handler that resizes PyTorch's CPU thread team to the cores other processes leave free, checked every
    ``interval_s`` seconds (and once, over ``probe_s``, as training starts). ``most``: the largest team (default: the
    team size when attached, i.e. ``torch.get_num_threads()``, which honours ``OMP_NUM_THREADS``)."""

    def __init__(self, interval_s: float = 5.0, probe_s: float = 0.3, most: int | None = None):
        self.interval_s, self.probe_s, self.most = interval_s, probe_s, most
        self.cores = cores_available()
        self.load: OtherLoad | None = None
        self.changes: list[tuple[int, int, float]] = []  # (iteration, threads, other processes' cores)
        self._next = 0.0

    def attach(self, engine) -> None:
        self.most = self.most or torch.get_num_threads()
        if self.most == 1:  # a one-thread team has nothing to give up
            return
        engine.add_event_handler(Events.STARTED, self._probe)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)
        engine.add_event_handler(Events.COMPLETED, self._restore)

    def _probe(self, engine) -> None:
        self.load = OtherLoad()
        time.sleep(self.probe_s)
        self._apply(engine)

    def _check(self, engine) -> None:
        if time.monotonic() >= self._next:
            self._apply(engine)

    def _apply(self, engine) -> None:
        self._next = time.monotonic() + self.interval_s
        others = self.load.sample() if self.load is not None else None
        if others is None:
            return
        n = threads_for(self.cores, others, self.most)
        if n != torch.get_num_threads():
            log.info("other processes use %.1f of %d cores: %d CPU thread(s) from iteration %d", others, self.cores, n,
                     engine.state.iteration)
            torch.set_num_threads(n)
            self.changes.append((engine.state.iteration, n, others))

    def _restore(self, engine) -> None:
        torch.set_num_threads(self.most)


__all__ = ["cores_available", "OtherLoad", "ThreadPolicy", "threads_for"]
