"""medhybrid.tracking: one MLflow run per medhybrid run, found again through state.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import mlflow_client, mlflow_store

from medhybrid import runs, tracking
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


def test_metrics_artifacts_and_finish(tmp_path, mlflow_uri):
    cfg = MLflowConfig(tracking_uri=mlflow_uri)
    run_id = runs.open_run(cfg, tmp_path / "run", "r")
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
    run_id = runs.open_run(cfg, tmp_path / "run", "r")
    tracking.log_artifact(cfg, run_id, tmp_path / "run" / "state.json")
    assert (tmp_path / "elsewhere" / "mlruns").is_dir()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
