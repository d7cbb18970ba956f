"""MLflow: one MLflow run per medhybrid run, created once and found again on resume.

The run id is kept in the run's output folder (``state.json``), so resuming continues the same MLflow
run, and two runs never merge even when they share a name. The embedded default store is SQLite in
the working folder (``sqlite:///<cwd>/mlflow.db``, artifacts in ``<cwd>/mlruns``); any tracking URI
(a real ``mlflow server``) can be configured instead, or set through ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from medhybrid.config import StrictModel


class MLflowConfig(StrictModel):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    experiment: str = "medhybrid"
    run_name: str | None = Field(None, description="None: derived from the run (mode, dataset)")
    log_every: int = Field(10, ge=1, description="log the training loss every N iterations")


def tracking_uri(cfg: MLflowConfig) -> str:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(f"MLflow tracking URI {uri!r}: the file store is not supported by MLflow 3; "
                         "use sqlite:///<path>/mlflow.db or an http(s):// server")
    return uri


def client(cfg: MLflowConfig):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))


def experiment_id(cfg: MLflowConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    uri = tracking_uri(cfg)
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    try:
        return c.create_experiment(cfg.experiment, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_state(folder: Path) -> dict:
    p = Path(folder) / "state.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def write_json(path: str | os.PathLike, data: Any, indent: int = 2, allow_nan: bool = True) -> Path:
    """Write ``data`` as JSON atomically: a reader (or a run killed mid-write) sees the old file or the new one,
    never half of one. ``allow_nan=False`` for strict JSON (NaN raises)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, allow_nan=allow_nan))
    os.replace(tmp, path)
    return path


def write_state(folder: Path, **updates) -> dict:
    """Update ``state.json`` atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = read_state(folder)
    state.update(updates)
    write_json(folder / "state.json", state)
    return state


def open_run(cfg: MLflowConfig, folder: Path, run_name: str, params: Mapping[str, Any] | None = None,
             tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """The MLflow run of the run in ``folder``: reopened if ``state.json`` names one, else created
    (with ``params`` and ``tags``) and recorded there."""
    from mlflow.entities import Param, RunTag

    c = client(cfg)
    state = read_state(folder)
    run_id = state.get("mlflow_run_id")
    if run_id:
        c.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(cfg), run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    if params:
        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            c.log_batch(run_id, params=flat[i : i + 100])
    c.log_batch(run_id, tags=[RunTag("medhybrid.folder", str(Path(folder).resolve()))])
    write_state(folder, mlflow_run_id=run_id, mlflow_tracking_uri=tracking_uri(cfg))
    return run_id


def finish_run(cfg: MLflowConfig, run_id: str, status: str = "FINISHED") -> None:
    client(cfg).set_terminated(run_id, status)


def log_metrics(cfg: MLflowConfig, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(cfg).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_artifact(cfg: MLflowConfig, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    client(cfg).log_artifact(run_id, str(path), artifact_path)


def claim_folder(folder: Path, config_hash: str) -> dict:
    """Create ``folder`` and return its ``state.json``; refuse (ConfigError) a folder holding a run of
    another configuration, so two runs never share a folder, checkpoints or an MLflow run."""
    from medhybrid.config import ConfigError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = read_state(folder)
    if state.get("config_hash") and state["config_hash"] != config_hash:
        raise ConfigError(f"{folder} holds a run of a different configuration (hash {state['config_hash']} != {config_hash}); "
                          "choose another output_dir or remove that folder")
    return state


@contextlib.contextmanager
def failing_marks(cfg: MLflowConfig, folder: Path, run_id: str | None):
    """On any exception in the body (a kill included): the MLflow run ends FAILED and the folder's state
    says ``failed``; the exception propagates. Re-running the same config resumes the same run."""
    try:
        yield
    except BaseException:
        if run_id:
            finish_run(cfg, run_id, "FAILED")
        write_state(folder, status="failed")
        raise


def close_run(cfg: MLflowConfig, folder: Path, run_id: str | None, artifacts: list[Path], **state) -> None:
    """Log ``artifacts``, end the MLflow run FINISHED and mark the folder finished (with ``state``)."""
    if run_id:
        for a in artifacts:
            log_artifact(cfg, run_id, a)
        finish_run(cfg, run_id)
    write_state(folder, status="finished", **state)
