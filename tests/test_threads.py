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


def test_cores_available_is_the_affinity_at_most():
    import os

    assert 1 <= threads.cores_available() <= len(os.sched_getaffinity(0))


@linux
def test_other_load_reads_the_machine_and_this_process():
    busy, own, wall = OtherLoad._read()
    assert busy >= own >= 0 and wall > 0


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
