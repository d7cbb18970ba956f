"""medhybrid.runs: a run folder's state.json and its one MLflow run, found again on resume."""

from __future__ import annotations

import json

import pytest
from conftest import mlflow_client

from medhybrid import runs, tracking
from medhybrid.tracking import MLflowConfig

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
