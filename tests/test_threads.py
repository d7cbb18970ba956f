"""medhybrid.threads: the CPU thread team follows the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from medhybrid import threads
from medhybrid.threads import OtherLoad, ThreadPolicy, threads_for

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
def test_other_load_sees_another_process_and_not_this_one():
    load = OtherLoad()
    time.sleep(0.5)
    if load.sample() > 0.3:
        pytest.skip("other processes already busy on this machine: nothing to measure against")
    t = time.monotonic()
    while time.monotonic() - t < 0.6:  # this process busy: not "other"
        sum(range(1000))
    assert load.sample() < 0.6
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        load.sample()
        time.sleep(1.0)
        assert load.sample() > 0.6
    finally:
        busy.kill()
        busy.wait()


@linux
def test_policy_shrinks_the_team_beside_a_busy_process_and_restores_it(monkeypatch):
    from ignite.engine import Engine

    monkeypatch.setattr(threads, "cores_available", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    policy = ThreadPolicy(interval_s=0.0, probe_s=0.5, most=2)
    seen = []
    engine = Engine(lambda e, b: seen.append(torch.get_num_threads()))
    policy.attach(engine)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        engine.run([0] * 3, max_epochs=1)
    finally:
        busy.kill()
        busy.wait()
    assert seen == [1, 1, 1] and policy.changes and policy.changes[0][1] == 1
    assert torch.get_num_threads() == 2  # the team is given back when training completes
    torch.set_num_threads(before)


def test_threads_are_not_part_of_a_run_hash():
    from medhybrid.config import load_dataset_spec
    from medhybrid.fewshot import few_shot_hash
    from medhybrid.finetune import FinetuneConfig

    base = dict(dataset=load_dataset_spec("ph2").model_dump(), method="scratch", budget=2, seed=0, output_dir="x",
                mlflow={"enabled": False})
    a = FinetuneConfig(**base, train={"threads": "auto"})
    b = FinetuneConfig(**base, train={"threads": 1})
    assert few_shot_hash(a) == few_shot_hash(b)
    with pytest.raises(Exception, match="threads"):
        FinetuneConfig(**base, train={"threads": 0})
