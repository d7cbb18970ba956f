"""medhybrid.core.tracking: one MLflow run per medhybrid run, found again through state.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import mlflow_client, mlflow_store

from medhybrid.core import runs, tracking
from medhybrid.core.tracking import MLflowConfig

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


def test_child_runs_are_the_parents_children_only(tmp_path, mlflow_uri):
    cfg = MLflowConfig(tracking_uri=mlflow_uri)
    parent = runs.open_run(cfg, tmp_path / "parent", "parent")
    kids = {runs.open_run(cfg, tmp_path / f"kid{i}", f"kid{i}", parent_run_id=parent) for i in range(3)}
    runs.open_run(cfg, tmp_path / "other", "other")  # same experiment, no parent
    c = mlflow_client(mlflow_uri)
    assert {r.info.run_id for r in tracking.child_runs(c, parent)} == kids
    assert tracking.child_runs(c, next(iter(kids))) == []


def test_store_in_another_folder(tmp_path, mlflow_template):
    uri = mlflow_store(mlflow_template, tmp_path / "elsewhere")
    cfg = MLflowConfig(tracking_uri=uri)
    run_id = runs.open_run(cfg, tmp_path / "run", "r")
    tracking.log_artifact(cfg, run_id, tmp_path / "run" / "state.json")
    assert (tmp_path / "elsewhere" / "mlruns").is_dir()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------- outages
def test_an_unreachable_server_stops_a_run_in_one_line_before_training(workdir, ph2_tiny, capsys):
    """``medhybrid finetune`` against a tracking URI where nothing listens: one line naming the URI, within seconds,
    nothing trained (no checkpoint), no traceback."""
    import socket
    import time

    from medhybrid.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    t = time.perf_counter()
    code = main(["finetune", "--config", "ph2", f"dataset={ph2_tiny}", "budget=2", f"output_dir={workdir / 'ft'}",
                 f"mlflow.tracking_uri={uri}", "train.device=cpu", "train.check_data=false"])
    took = time.perf_counter() - t
    err = capsys.readouterr().err
    assert code == 2 and took < 10, (code, took)
    assert err.strip().splitlines() == [f"error: MLflow tracking server {uri} does not answer (ConnectionError); nothing was "
                                        "trained: start it, set mlflow.tracking_uri to one that answers, or mlflow.enabled=false"]
    assert not (workdir / "ft" / "checkpoints").exists() and "mlflow_run_id" not in runs.read_state(workdir / "ft")


def test_writes_during_an_outage_wait_in_the_outbox_and_are_sent_once(tmp_path, mlflow_uri, monkeypatch):
    """A store that stops answering mid-run: metrics, an artifact and the run's end wait in the folder's outbox (no
    request within the retry window), then reach the store in order, once, at the next write or by :func:`sync`."""
    import sqlalchemy.exc

    cfg = MLflowConfig(tracking_uri=mlflow_uri)
    folder = tmp_path / "run"
    run_id = runs.open_run(cfg, folder, "r")
    tracking.log_metrics(cfg, run_id, {"loss": 1.0}, step=1)
    real = tracking._apply
    calls = []

    def down(cfg, c, rec, folder=None):
        calls.append(rec["op"])
        raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("unable to open database file"))

    monkeypatch.setattr(tracking, "_apply", down)
    tracking.log_metrics(cfg, run_id, {"loss": 0.5}, step=2)
    note = tmp_path / "note.txt"
    note.write_text("kept")
    tracking.log_artifact(cfg, run_id, note)
    tracking.finish_run(cfg, run_id)
    assert calls == ["log_batch"]  # one try, then nothing is sent within the retry window
    assert [r["op"] for r in tracking.Outbox(folder).records()] == ["log_batch", "log_artifact", "set_terminated"]
    assert tracking.pending(folder) == 3

    monkeypatch.setattr(tracking, "_apply", real)
    assert tracking.sync(tmp_path) == {str(folder): 0} and not (folder / tracking.OUTBOX).exists()
    assert tracking.sync(tmp_path) == {}  # nothing left: a second sync sends nothing twice
    c = mlflow_client(mlflow_uri)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 0.5)]
    assert [a.path for a in c.list_artifacts(run_id)] == ["note.txt"] and c.get_run(run_id).info.status == "FINISHED"
    tracking._OFFLINE_UNTIL.clear()


def test_a_run_opened_during_an_outage_is_created_when_its_records_are_sent(tmp_path, mlflow_uri, monkeypatch):
    """Once a command has reached its store, a later run of it (an ablation's next fine-tune) opens while the store is
    down: it gets a placeholder id, trains, and its MLflow run is created, with everything it logged, by sync."""
    cfg = MLflowConfig(tracking_uri=mlflow_uri)
    runs.open_run(cfg, tmp_path / "first", "first")  # the command has reached its store
    monkeypatch.setattr(tracking, "check_reachable", lambda cfg: (_ for _ in ()).throw(tracking.TrackingUnavailable("down")))
    folder = tmp_path / "second"
    run_id = runs.open_run(cfg, folder, "second", params={"budget": 2}, tags={"method": "m"})
    assert run_id.startswith("pending-") and runs.read_state(folder)["mlflow_run_id"] == run_id
    tracking.log_metrics(cfg, run_id, {"test_dice": 0.7}, step=0)
    tracking.finish_run(cfg, run_id)
    assert [r["op"] for r in tracking.Outbox(folder).records()] == ["create_run", "log_batch", "set_terminated"]

    monkeypatch.undo()
    tracking._OFFLINE_UNTIL.clear()
    assert tracking.sync(folder) == {str(folder): 0}
    real = runs.read_state(folder)["mlflow_run_id"]
    assert not real.startswith("pending-")
    run = mlflow_client(mlflow_uri).get_run(real)
    assert run.info.status == "FINISHED" and run.data.metrics == {"test_dice": 0.7}
    assert run.data.params == {"budget": "2"} and run.data.tags["method"] == "m"
    assert run.data.tags["medhybrid.folder"] == str(folder.resolve())


def _server(store: str, port: int, folder: Path):
    import sys

    from conftest import running_server

    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", store,
           "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]
    return running_server(cmd, f"http://127.0.0.1:{port}/health", folder / f"server-{port}.log", "mlflow server", 120,
                          cwd=folder)


@pytest.mark.slow
def test_a_pretraining_outlives_its_tracking_server(workdir, isic_tiny, mlflow_template, capsys):
    """A real ``mlflow server``, killed by PID in the middle of a ``medhybrid pretrain``: training goes on and
    finishes; after the server is back, ``medhybrid sync`` sends what the run kept, and the MLflow run holds every
    epoch's metrics exactly once."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import yaml
    from conftest import TINY_NET, TINY_TRAIN, cli_env

    from medhybrid.core.config import apply_overrides

    folder = workdir / "server"
    store = mlflow_store(mlflow_template, folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    conf = workdir / "pretrain.yaml"
    conf.write_text(yaml.safe_dump(apply_overrides({"dataset": str(isic_tiny), "mode": "hybrid"},
                                                   [*TINY_NET, *TINY_TRAIN, "train.epochs=4", "train.epoch_length=8"])))
    out = workdir / "pre"
    env = cli_env(MEDHYBRID_TRACKING_RETRY_S="600")
    cmd = [sys.executable, "-m", "medhybrid.cli", "pretrain", "--config", str(conf), f"output_dir={out}",
           f"mlflow.tracking_uri={uri}"]
    with _server(store, port, folder) as server:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not list((out / "checkpoints").glob("*.pt")):  # epoch 1 is logged and checkpointed
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # the server's own process group, started by this test
        server.wait()
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "cannot be reached" in stderr and "Traceback" not in stderr
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "finished" and tracking.pending(out) > 0
    run_id = state["mlflow_run_id"]

    with _server(store, port, folder):
        from medhybrid.cli import main

        assert main(["sync", str(out)]) == 0
        assert "synced 1 of 1 run folder(s)" in capsys.readouterr().out and not (out / tracking.OUTBOX).exists()
        c = mlflow_client(uri)
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in c.get_metric_history(run_id, "train_loss")) == [1, 2, 3, 4]  # every epoch, once
        for key in run.data.metrics:  # nothing logged twice
            history = [(m.step, m.timestamp) for m in c.get_metric_history(run_id, key)]
            assert len(history) == len(set(history)), key


def _open_store(uri: str) -> str:
    from medhybrid.core import tracking as t

    t.ensure_store(uri)
    return t.experiment_id(MLflowConfig(tracking_uri=uri))


@pytest.mark.slow
def test_a_fresh_store_opened_by_two_processes_at_once_is_created_once(tmp_path):
    """Two processes open one SQLite store that does not exist yet, at the same moment: its tables are created once
    under the lock beside it; every process gets the same experiment, none fails."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        ids = pool.map(_open_store, [uri] * 2)
    assert len(set(ids)) == 1 and (tmp_path / "fresh" / "mlflow.db.lock").is_file()
