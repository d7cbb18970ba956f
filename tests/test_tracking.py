"""medhybrid.tracking: one MLflow run per medhybrid run, found again through state.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import mlflow_client, mlflow_store

from medhybrid import tracking
from medhybrid.tracking import MLflowConfig

pytestmark = pytest.mark.usefixtures("workdir")


def test_tracking_uri(workdir, monkeypatch):
    assert tracking.tracking_uri(MLflowConfig()) == f"sqlite:///{workdir / 'mlflow.db'}"  # default: the working folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert tracking.tracking_uri(MLflowConfig()) == "http://localhost:5000"
    assert tracking.tracking_uri(MLflowConfig(tracking_uri="sqlite:////x/m.db")) == "sqlite:////x/m.db"  # config wins
    for bad in ("file:///tmp/mlruns", "/tmp/mlruns", "mlruns"):
        with pytest.raises(ValueError, match="file store is not supported"):
            tracking.tracking_uri(MLflowConfig(tracking_uri=bad))


def test_flatten():
    assert tracking.flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}}) == {"a": 1, "b.c": [1, 2], "b.d.e": None}


def test_state_file(tmp_path):
    assert tracking.read_state(tmp_path / "run") == {}
    tracking.write_state(tmp_path / "run", status="running", n=1)
    state = tracking.write_state(tmp_path / "run", status="finished", metrics={"x": 0.5})
    assert state == {"status": "finished", "n": 1, "metrics": {"x": 0.5}}
    assert json.loads((tmp_path / "run" / "state.json").read_text()) == state
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["state.json"]  # no temporary left


def test_write_json_is_atomic(tmp_path):
    """The file is replaced whole, no temporary file stays behind, and a strict write that fails (NaN) leaves
    the previous content in place."""
    path = tracking.write_json(tmp_path / "a.json", {"x": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"x": [1, 2]} and path.read_text().startswith("{\n \"x\"")
    with pytest.raises(ValueError):
        tracking.write_json(path, {"x": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_open_run_creates_then_reopens(tmp_path, mlflow_uri):
    cfg = MLflowConfig(tracking_uri=mlflow_uri, experiment="exp")
    folder = tmp_path / "run"
    params = {"mode": "hybrid", "train": {"lr": 0.001, "epochs": 2}, "long": "x" * 7000,
              **{f"p{i}": i for i in range(150)}}  # more than one log_batch of params
    run_id = tracking.open_run(cfg, folder, "my-run", params=params, tags={"medhybrid.stage": "pretrain"})
    c = mlflow_client(mlflow_uri)
    run = c.get_run(run_id)
    assert run.info.run_name == "my-run" and run.info.status == "RUNNING"
    assert run.data.params["mode"] == "hybrid" and run.data.params["train.lr"] == "0.001"
    assert run.data.params["train.epochs"] == "2" and run.data.params["p149"] == "149"
    assert len(run.data.params["long"]) == 6000
    assert run.data.tags["medhybrid.stage"] == "pretrain" and run.data.tags["medhybrid.folder"] == str(folder.resolve())
    state = tracking.read_state(folder)
    assert state["mlflow_run_id"] == run_id and state["mlflow_tracking_uri"] == mlflow_uri
    # the experiment's artifacts live beside the SQLite store, not in the working folder
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").resolve().as_uri())

    tracking.finish_run(cfg, run_id, "FAILED")
    assert c.get_run(run_id).info.status == "FAILED"
    again = tracking.open_run(cfg, folder, "my-run", params={"mode": "other"})
    assert again == run_id and c.get_run(run_id).info.status == "RUNNING"  # reopened, params not rewritten
    assert c.get_run(run_id).data.params["mode"] == "hybrid"
    assert len(c.search_runs([c.get_experiment_by_name("exp").experiment_id])) == 1


def test_same_name_two_folders_two_runs(tmp_path, mlflow_uri):
    cfg = MLflowConfig(tracking_uri=mlflow_uri)
    a = tracking.open_run(cfg, tmp_path / "a", "same")
    b = tracking.open_run(cfg, tmp_path / "b", "same")
    assert a != b
    c = mlflow_client(mlflow_uri)
    runs = c.search_runs([c.get_experiment_by_name("medhybrid").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([a, b]) and {r.info.run_name for r in runs} == {"same"}


def test_parent_run(tmp_path, mlflow_uri):
    cfg = MLflowConfig(tracking_uri=mlflow_uri)
    parent = tracking.open_run(cfg, tmp_path / "parent", "parent")
    child = tracking.open_run(cfg, tmp_path / "child", "child", parent_run_id=parent)
    assert mlflow_client(mlflow_uri).get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_metrics_artifacts_and_finish(tmp_path, mlflow_uri):
    cfg = MLflowConfig(tracking_uri=mlflow_uri)
    run_id = tracking.open_run(cfg, tmp_path / "run", "r")
    tracking.log_metrics(cfg, run_id, {"test_dice": 0.75, "n": 3}, step=2)
    tracking.log_metrics(cfg, run_id, {"test_dice": 0.8}, step=3)
    f = tmp_path / "note.txt"
    f.write_text("hello")
    tracking.log_artifact(cfg, run_id, f)
    tracking.log_artifact(cfg, run_id, f, "sub")
    tracking.finish_run(cfg, run_id)
    c = mlflow_client(mlflow_uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"test_dice": 0.8, "n": 3.0}
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "test_dice")] == [(2, 0.75), (3, 0.8)]
    assert [a.path for a in c.list_artifacts(run_id)] == ["note.txt", "sub"]
    local = Path(c.download_artifacts(run_id, "sub/note.txt", str(tmp_path)))
    assert local.read_text() == "hello"


def test_store_in_another_folder(tmp_path, mlflow_template):
    uri = mlflow_store(mlflow_template, tmp_path / "elsewhere")
    cfg = MLflowConfig(tracking_uri=uri)
    run_id = tracking.open_run(cfg, tmp_path / "run", "r")
    tracking.log_artifact(cfg, run_id, tmp_path / "run" / "state.json")
    assert (tmp_path / "elsewhere" / "mlruns").is_dir()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
