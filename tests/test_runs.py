"""medhybrid.core.runs: a run folder's state.json and its one MLflow run, found again on resume."""

from __future__ import annotations

import json

import pytest
from conftest import cli_env, mlflow_client

from medhybrid.core import runs, tracking
from medhybrid.core.tracking import MLflowConfig

pytestmark = pytest.mark.usefixtures("workdir")


def test_state_file(tmp_path):
    assert runs.read_state(tmp_path / "run") == {}
    runs.write_state(tmp_path / "run", status="running", n=1)
    state = runs.write_state(tmp_path / "run", status="finished", metrics={"x": 0.5})
    assert state == {"status": "finished", "n": 1, "metrics": {"x": 0.5}}
    assert json.loads((tmp_path / "run" / "state.json").read_text()) == state
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["state.json"]  # no temporary left


def test_open_run_creates_then_reopens(tmp_path, mlflow_uri):
    cfg = MLflowConfig(tracking_uri=mlflow_uri, experiment="exp")
    folder = tmp_path / "run"
    params = {"mode": "hybrid", "train": {"lr": 0.001, "epochs": 2}, "long": "x" * 7000,
              **{f"p{i}": i for i in range(150)}}  # more than one log_batch of params
    run_id = runs.open_run(cfg, folder, "my-run", params=params, tags={"medhybrid.stage": "pretrain"})
    c = mlflow_client(mlflow_uri)
    run = c.get_run(run_id)
    assert run.info.run_name == "my-run" and run.info.status == "RUNNING"
    assert run.data.params["mode"] == "hybrid" and run.data.params["train.lr"] == "0.001"
    assert run.data.params["train.epochs"] == "2" and run.data.params["p149"] == "149"
    assert len(run.data.params["long"]) == 6000
    assert run.data.tags["medhybrid.stage"] == "pretrain" and run.data.tags["medhybrid.folder"] == str(folder.resolve())
    state = runs.read_state(folder)
    assert state["mlflow_run_id"] == run_id and state["mlflow_tracking_uri"] == mlflow_uri
    # the experiment's artifacts live beside the SQLite store, not in the working folder
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").resolve().as_uri())

    tracking.finish_run(cfg, run_id, "FAILED")
    assert c.get_run(run_id).info.status == "FAILED"
    again = runs.open_run(cfg, folder, "my-run", params={"mode": "other"})
    assert again == run_id and c.get_run(run_id).info.status == "RUNNING"  # reopened, params not rewritten
    assert c.get_run(run_id).data.params["mode"] == "hybrid"
    assert len(c.search_runs([c.get_experiment_by_name("exp").experiment_id])) == 1


def test_same_name_two_folders_two_runs(tmp_path, mlflow_uri):
    cfg = MLflowConfig(tracking_uri=mlflow_uri)
    a = runs.open_run(cfg, tmp_path / "a", "same")
    b = runs.open_run(cfg, tmp_path / "b", "same")
    assert a != b
    c = mlflow_client(mlflow_uri)
    found = c.search_runs([c.get_experiment_by_name("medhybrid").experiment_id])
    assert sorted(r.info.run_id for r in found) == sorted([a, b]) and {r.info.run_name for r in found} == {"same"}


def test_parent_run(tmp_path, mlflow_uri):
    cfg = MLflowConfig(tracking_uri=mlflow_uri)
    parent = runs.open_run(cfg, tmp_path / "parent", "parent")
    child = runs.open_run(cfg, tmp_path / "child", "child", parent_run_id=parent)
    assert mlflow_client(mlflow_uri).get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_scores_of_a_run_folder():
    """What an evaluated run was scored on and its summary; folders from before the set was recorded are test scores."""
    assert runs.scores({"status": "finished"}) == (None, {})
    assert runs.scores({"evaluated": True, "scored_on": "dev", "scores": {"dev_dice": 0.7}}) == ("dev", {"dev_dice": 0.7})
    assert runs.scores({"evaluated": True, "test": {"test_dice": 0.8}}) == ("test", {"test_dice": 0.8})


def test_a_folder_in_use_by_another_process_is_refused_naming_it(tmp_path):
    """A real second process holds the run folder: claiming it fails at once, naming that process; once the holder is
    killed (by its PID) the operating system has dropped the lock, and the claim succeeds (nothing to clean up)."""
    import subprocess
    import sys
    import time

    from medhybrid.core.runs import FolderInUse, Run
    from medhybrid.core.tracking import MLflowConfig

    folder = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from medhybrid.core.runs import Run; from medhybrid.core.tracking import "
            "MLflowConfig; r = Run.claim(Path(sys.argv[1]), 'h', MLflowConfig(enabled=False)); print('held', flush=True); "
            "time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=rf"in use by process {holder.pid} on "):
            Run.claim(folder, "h", MLflowConfig(enabled=False))
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with Run.claim(folder, "h", MLflowConfig(enabled=False)) as run:
        assert run.lock.held and not run.finished
        run.start(_Cfg(), "r")
        run.finish([])
    assert not run.lock.held
    with Run.claim(folder, "h", MLflowConfig(enabled=False)) as again:
        assert again.finished is False  # finished, but no model.pt


def test_the_lock_is_released_and_the_run_marked_when_it_fails_or_stops(tmp_path):
    """Leaving the run's block releases its lock whatever happens; an exception after the start marks the folder
    failed, a graceful stop marks it stopped, and an exception before the start leaves the state alone."""
    import signal

    from medhybrid.core.runs import Run, RunStopped, read_state
    from medhybrid.core.tracking import MLflowConfig

    off = MLflowConfig(enabled=False)
    with pytest.raises(RuntimeError), Run.claim(tmp_path / "early", "h", off) as run:
        raise RuntimeError("before the start")
    assert not run.lock.held and read_state(tmp_path / "early").get("status") is None
    with pytest.raises(RuntimeError), Run.claim(tmp_path / "run", "h", off) as run:
        run.start(_Cfg(), "r")
        raise RuntimeError("boom")
    assert not run.lock.held and read_state(tmp_path / "run")["status"] == "failed"
    with pytest.raises(RunStopped), Run.claim(tmp_path / "run", "h", off) as run:
        run.start(_Cfg(), "r")
        raise RunStopped(signal.SIGTERM, 3, None)
    assert not run.lock.held and read_state(tmp_path / "run")["status"] == "stopped"
    with Run.claim(tmp_path / "run", "h", off) as again:
        assert again.lock.held and not again.finished


class _Cfg:
    """The least a run's config must offer :meth:`Run.start` (it is written as config.yaml)."""

    def model_dump(self, mode="json"):
        return {"k": 1}


# --------------------------------------------------------------------------------------------- two processes, one folder
def _together(cmd: list[str], cwd, n: int = 2) -> list:
    """``n`` copies of ``cmd`` started at the same moment (as a shell loop that launched twice): their results."""
    import subprocess

    procs = [subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append((p.returncode, stdout, stderr, p.pid))
    return out


@pytest.mark.slow
def test_two_finetunes_started_together_on_a_fresh_store_one_trains_one_is_refused(workdir, ph2_tiny):
    """The same ``medhybrid finetune`` twice at once, in a project with no MLflow store yet: the store is created once
    (no schema race), exactly one process trains, the other stops at once in one line naming the first, and the store
    holds one MLflow run."""
    import sys

    import yaml

    db = workdir / "fresh" / "mlflow.db"
    assert not db.exists()
    conf = workdir / "ft.yaml"
    conf.write_text(yaml.safe_dump({
        "dataset": str(ph2_tiny), "budget": 2, "seed": 0, "method": "twice", "preprocess": {"resolution": 32},
        "model": {"channels": [16, 32, 32], "attention_levels": [False, False, False]},
        "train": {"batch_size": 2, "warmup_iterations": 0, "device": "cpu", "check_data": False, "progress": False},
        "schedule": {"per_label": 1, "min_iterations": 40, "max_iterations": 40, "epochs": 2}}))
    cmd = [sys.executable, "-m", "medhybrid.cli", "finetune", "--config", str(conf), f"output_dir={workdir / 'ft'}",
           f"mlflow.tracking_uri=sqlite:///{db}"]
    results = _together(cmd, workdir)
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(ok) == 1 and len(refused) == 1, [(r[0], r[2][-2000:]) for r in results]
    code, _, stderr, _ = refused[0]
    assert code == 2 and "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert f"in use by process {ok[0][3]} on " in line
    assert "fine-tuned on 2 labelled images" in ok[0][1]
    state = json.loads((workdir / "ft" / "state.json").read_text())
    assert state["status"] == "finished"
    runs_ = mlflow_client(f"sqlite:///{db}").search_runs([e.experiment_id for e in
                                                          mlflow_client(f"sqlite:///{db}").search_experiments()])
    assert [r.info.run_id for r in runs_] == [state["mlflow_run_id"]] and runs_[0].info.status == "FINISHED"
