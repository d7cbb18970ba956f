"""MLflow: the tracking URI, the experiment, a run's metrics and artifacts, and the MONAI handler that logs an engine
into a run (:func:`engine_handler`).

Each medhybrid run has one MLflow run, created (with its parameters) once and found again on resume through the run
folder's ``state.json`` (:mod:`medhybrid.runs`), so two runs never merge even when they share a name. The embedded
default store is SQLite in the working folder (``sqlite:///<cwd>/mlflow.db``, artifacts in ``<cwd>/mlruns``); any tracking URI
(a real ``mlflow server``) can be configured instead, or set through ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from monai.handlers import MLFlowHandler
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


class RunHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` bound to one existing MLflow run, given by id. MONAI's own handler finds its run by
    name (or makes one), which could pick another folder's unfinished run of the same name: a run folder owns exactly
    one MLflow run (:mod:`medhybrid.runs`), so the handler is told which."""

    def __init__(self, run_id: str, **kwargs):
        super().__init__(**kwargs)
        self.run_id = run_id

    def start(self, engine) -> None:
        if not self.cur_run:
            self.cur_run = self.client.get_run(self.run_id)
        super().start(engine)


def engine_handler(cfg: MLflowConfig, run_id: str, evaluator: bool = False) -> MLFlowHandler:
    """MONAI's ``MLFlowHandler`` writing into the existing run ``run_id``: a trainer's loss every ``cfg.log_every``
    iterations and its epoch metrics, or (``evaluator``) an evaluator's metrics. With no ``global_epoch_transform``:
    MONAI's ``ValidationHandler`` runs the evaluator with the trainer's epoch as its own, so validation metrics are logged
    at the epoch they belong to. The run stays open (its owner finishes it)."""
    return RunHandler(run_id, tracking_uri=tracking_uri(cfg), experiment_name=cfg.experiment,
                      iteration_log=False if evaluator else (lambda e, it: it % cfg.log_every == 0),
                      output_transform=lambda o: {"loss": o["loss"].item()}, close_on_complete=False)


def finish_run(cfg: MLflowConfig, run_id: str, status: str = "FINISHED") -> None:
    client(cfg).set_terminated(run_id, status)


def log_metrics(cfg: MLflowConfig, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    client(cfg).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_artifact(cfg: MLflowConfig, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    client(cfg).log_artifact(run_id, str(path), artifact_path)


__all__ = ["client", "engine_handler", "experiment_id", "finish_run", "flatten", "log_artifact", "log_metrics",
           "MLflowConfig", "RunHandler", "tracking_uri"]
