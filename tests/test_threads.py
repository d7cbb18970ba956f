"""medhybrid.core.threads: the CPU thread team follows the cores other processes leave free."""

from __future__ import annotations

import sys

import pytest
import torch

from medhybrid.core import threads
from medhybrid.core.threads import OtherLoad, ThreadPolicy, threads_for

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_threads_for_leaves_the_busy_cores():
    assert threads_for(2, 0.0, 2) == 2
    assert threads_for(2, 1.0, 2) == 1 and threads_for(2, 0.9, 2) == 1  # one busy process takes one of two cores
    assert threads_for(2, 0.5, 2) == 2  # half a core used elsewhere: keep the team
    assert threads_for(2, 3.0, 2) == 1  # never fewer than one
    assert threads_for(16, 3.0, 8) == 8 and threads_for(16, 10.0, 8) == 6


@pytest.mark.parametrize("cpu_max, cores", [
    (None, 8),  # no cgroup v2 CPU controller here: the affinity
    ("max 100000\n", 8),  # no quota
    ("200000 100000\n", 2),  # a quota of two cores
    ("250000 100000\n", 2),  # two and a half cores: two whole ones
    ("50000 100000\n", 1),  # half a core: still one
    ("1600000 100000\n", 8),  # a quota above the affinity: the affinity
    ("garbage", 8),  # unreadable: the affinity
])
def test_cores_available_is_the_affinity_capped_by_the_cgroup_quota(monkeypatch, cpu_max, cores):
    """Scripted affinity (8 CPUs) and ``/sys/fs/cgroup/cpu.max`` contents: the cores the policy sizes the team for."""

    class CpuMax:
        def __init__(self, path):
            assert str(path) == "/sys/fs/cgroup/cpu.max"

        def read_text(self):
            if cpu_max is None:
                raise FileNotFoundError("/sys/fs/cgroup/cpu.max")
            return cpu_max

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "Path", CpuMax)
    assert threads.cores_available() == cores


@linux
def test_other_load_counts_this_processs_cpu_time():
    """Real /proc counters around 0.4 s of CPU burnt in this process: this process's ticks grow by that CPU time (to
    the counters' resolution), the machine's busy ticks by at least as much, the wall clock by at least as much."""
    import os
    import time

    tick = os.sysconf("SC_CLK_TCK")
    first, cpu0, thread0 = OtherLoad._read(), time.process_time(), time.thread_time()
    while time.thread_time() - thread0 < 0.4:
        pass
    second, cpu, burnt = OtherLoad._read(), time.process_time() - cpu0, time.thread_time() - thread0
    busy, own, wall = (b - a for a, b in zip(first, second, strict=True))
    assert abs(own / tick - cpu) <= 0.05, (own / tick, cpu)  # the process's CPU time, all its threads
    assert busy >= own - 2 and wall >= burnt - 0.02, (busy, own, wall, burnt)


def test_other_load_is_the_machines_ticks_minus_this_processs_per_second(monkeypatch):
    """Scripted /proc counters (no dependence on what else runs here): 150 busy ticks of which 50 are this process's,
    over 0.5 s at 100 ticks/s, are 2 cores used by others; a window shorter than min_window_s gives no sample."""
    readings = iter([(1000.0, 100.0, 10.0), (1150.0, 150.0, 10.5), (1160.0, 155.0, 10.6), (1260.0, 160.0, 11.5)])
    monkeypatch.setattr(OtherLoad, "_read", staticmethod(lambda: next(readings)))
    load = OtherLoad(min_window_s=0.25)
    load.tick = 100
    assert load.sample() == pytest.approx(2.0)
    assert load.sample() is None  # 0.1 s: too short to measure, the window goes on
    assert load.sample() == pytest.approx(((1260 - 1150) - (160 - 150)) / 100 / 1.0)  # from the last measured reading


def test_policy_shrinks_the_team_beside_a_busy_process_and_restores_it(monkeypatch):
    """A scripted load (one core busy elsewhere, then none): the team goes to one thread, back to two when the load
    has gone, and is given back when training completes."""
    from ignite.engine import Engine

    script = iter([1.0, 1.0, 0.0, 0.0])

    class Scripted:
        def sample(self):
            return next(script)

    monkeypatch.setattr(threads, "cores_available", lambda: 2)
    monkeypatch.setattr(threads, "OtherLoad", Scripted)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    policy = ThreadPolicy(interval_s=0.0, probe_s=0.0, most=2)
    seen = []
    engine = Engine(lambda e, b: seen.append(torch.get_num_threads()))
    policy.attach(engine)
    try:
        engine.run([0] * 3, max_epochs=1)
    finally:
        final = torch.get_num_threads()
        torch.set_num_threads(before)
    assert seen == [1, 1, 2] and [c[1] for c in policy.changes] == [1, 2]
    assert final == 2


def test_policy_sizes_the_team_from_scripted_proc_readings(monkeypatch, caplog):
    """The policy end to end on 4 cores, from scripted /proc counters (machine busy ticks, this process's ticks, wall
    seconds) read by the real :class:`OtherLoad`: others use 2.0 cores at the start (2 threads), 0.6 after iteration 1
    (all 4 again), a 0.1 s window after iteration 2 (too short: no change), 3.5 after iteration 3 (never fewer than 1),
    1.0 after iteration 4 (3); the team goes back to 4 when training completes."""
    import logging
    import os

    from ignite.engine import Engine

    t = os.sysconf("SC_CLK_TCK")
    readings = iter([(0.0, 0.0, 0.0),  # OtherLoad() at the start
                     (3.0 * t, 1.0 * t, 1.0),  # the probe: 2 of 3 busy core-seconds are others', over 1 s
                     (4.6 * t, 2.0 * t, 2.0),  # 0.6 others
                     (4.7 * t, 2.0 * t, 2.1),  # 0.1 s after the last measured reading: no sample
                     (9.1 * t, 3.0 * t, 3.0),  # since the reading at 2.0 s: 4.5 busy, 1.0 own, over 1 s: 3.5 others
                     (10.6 * t, 3.5 * t, 4.0)])  # 1.5 busy, 0.5 own: 1.0 others
    monkeypatch.setattr(OtherLoad, "_read", staticmethod(lambda: next(readings)))
    monkeypatch.setattr(threads, "cores_available", lambda: 4)
    before = torch.get_num_threads()
    policy = ThreadPolicy(interval_s=0.0, probe_s=0.0, most=4)
    seen = []
    engine = Engine(lambda e, b: seen.append(torch.get_num_threads()))
    policy.attach(engine)
    try:
        with caplog.at_level(logging.INFO, logger="medhybrid"):
            engine.run([0] * 4, max_epochs=1)
        final = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 4, 4, 1]
    assert [(it, n) for it, n, _ in policy.changes] == [(0, 2), (1, 4), (3, 1), (4, 3)]
    assert [others for *_, others in policy.changes] == pytest.approx([2.0, 0.6, 3.5, 1.0])
    assert final == 4
    assert "other processes use 3.5 of 4 cores: 1 CPU thread(s) from iteration 3" in caplog.text
    with pytest.raises(StopIteration):  # every scripted reading was used, none twice
        next(readings)


def test_threads_are_not_part_of_a_run_hash():
    from medhybrid.data.specs import load_dataset_spec
    from medhybrid.workflows.fewshot import few_shot_hash
    from medhybrid.workflows.finetune import FinetuneConfig

    base = dict(dataset=load_dataset_spec("ph2").model_dump(), method="scratch", budget=2, seed=0, output_dir="x",
                mlflow={"enabled": False})
    a = FinetuneConfig(**base, train={"threads": "auto"})
    b = FinetuneConfig(**base, train={"threads": 1})
    assert few_shot_hash(a) == few_shot_hash(b)
    with pytest.raises(Exception, match="threads"):
        FinetuneConfig(**base, train={"threads": 0})
