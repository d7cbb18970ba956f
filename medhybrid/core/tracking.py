"""MLflow: the tracking URI, the experiment, a run's metrics and artifacts, and the MONAI handler that logs an engine
into a run (:func:`engine_handler`).

Each medhybrid run has one MLflow run, created (with its parameters) once and found again on resume through the run
folder's ``state.json`` (:mod:`medhybrid.core.runs`), so two runs never merge even when they share a name. The embedded
default store is SQLite in the working folder (``sqlite:///<cwd>/mlflow.db``, artifacts in ``<cwd>/mlruns``); any tracking URI
(a real ``mlflow server``) can be configured instead, or set through ``MLFLOW_TRACKING_URI``.

Tracking never costs a run its training:

- a fresh SQLite store is created once, under a file lock beside it, however many processes start together
  (:func:`ensure_store`);
- at the start of a run an unreachable server is one line within seconds, before anything trains
  (:func:`check_reachable`, :class:`TrackingUnavailable`);
- during a run, a write that cannot reach the server is kept, in order, in the run folder's
  ``mlflow-outbox.jsonl`` (:class:`Outbox`) and sent when the server answers again, at the run's next write, or
  afterwards with ``medhybrid sync <folder>`` (:func:`sync`). Replaying is idempotent: metrics keep the timestamp
  they were recorded with (MLflow drops an identical metric), params and tags keep their values, an artifact
  overwrites its own copy, so nothing is lost or logged twice.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from monai.handlers import MLFlowHandler
from pydantic import Field

from medhybrid.core.config import ConfigError, StrictModel
from medhybrid.core.files import atomic_write

log = logging.getLogger("medhybrid")

HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
"""MLflow's own default retries an unreachable server for minutes before it raises; a run keeps its records in its
outbox instead, so one short retry is enough. Set (where the user has not set them) when tracking is first used,
not at import: :func:`tracking_uri`."""

OUTBOX = "mlflow-outbox.jsonl"
"""A run folder's MLflow writes that have not reached the tracking server yet, one JSON line each, in order."""


class MLflowConfig(StrictModel):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    experiment: str = "medhybrid"
    run_name: str | None = Field(None, description="None: derived from the run (mode, dataset)")
    log_every: int = Field(10, ge=1, description="log the training loss every N iterations")


def tracking_uri(cfg: MLflowConfig) -> str:
    """The store every MLflow call of a run goes to (every call asks this first, which also applies
    :data:`HTTP_SETTINGS`)."""
    for k, v in HTTP_SETTINGS.items():
        os.environ.setdefault(k, v)
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(f"MLflow tracking URI {uri!r}: the file store is not supported by MLflow 3; "
                         "use sqlite:///<path>/mlflow.db or an http(s):// server")
    return uri


class TrackingUnavailable(ConfigError):
    """The tracking server does not answer at the start of a run."""


_READY: set[str] = set()


def ensure_store(uri: str) -> None:
    """Create a SQLite store's schema once, under an exclusive lock on ``<db>.lock`` beside it: processes that start
    together on a fresh project (two terminals, an ablation's workers) wait for the first one instead of creating the
    same tables at once. Other stores (a server) are left alone."""
    if uri in _READY or not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes (or the process ends)
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates or upgrades the schema
    _READY.add(uri)


def check_reachable(cfg: MLflowConfig, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailable` (one line naming the URI) when the tracking server does not answer its
    ``/health`` within ``timeout`` seconds; a SQLite store is created if need be (:func:`ensure_store`)."""
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        ensure_store(uri)
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except requests.RequestException as e:
        reason = type(e).__name__ if not isinstance(e, requests.HTTPError) else f"HTTP {e.response.status_code}"
        raise TrackingUnavailable(f"MLflow tracking server {uri} does not answer ({reason}); nothing was trained: start it, "
                                  "set mlflow.tracking_uri to one that answers, or mlflow.enabled=false") from None


_REACHED = "MEDHYBRID_TRACKING_REACHED"
"""Environment variable naming the tracking URI this process (or the one that started it) has reached."""


def reachable(cfg: MLflowConfig) -> bool:
    """Whether the tracking store answers now. At the start of a command it must: an unreachable store raises
    :class:`TrackingUnavailable` before anything trains. Once it has answered in this command (its workers included),
    an outage is ``False``: the command's later runs go on and keep their records (:func:`open_run_later`)."""
    uri = tracking_uri(cfg)
    if time.monotonic() < _OFFLINE_UNTIL.get(uri, 0.0):
        return False
    try:
        check_reachable(cfg)
    except TrackingUnavailable:
        if os.environ.get(_REACHED) != uri:
            raise
        _OFFLINE_UNTIL[uri] = time.monotonic() + retry_after_s()
        return False
    os.environ[_REACHED] = uri
    return True


def client(cfg: MLflowConfig):
    uri = tracking_uri(cfg)
    ensure_store(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


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


def child_runs(c, parent_run_id: str, experiment_ids: list[str] | None = None) -> list:
    """The MLflow runs whose parent is ``parent_run_id`` (an ablation's fine-tunes, an active-learning experiment's
    steps), through the client ``c``; searched in the parent's experiment unless ``experiment_ids`` are given."""
    ids = experiment_ids or [c.get_run(parent_run_id).info.experiment_id]
    return c.search_runs(ids, filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------------------------------ the outbox
def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking store could not be reached (as opposed to a write it refused)."""
    import requests
    import sqlalchemy.exc

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, sqlalchemy.exc.OperationalError, ConnectionError)):
        return True
    return isinstance(exc, mlflow.exceptions.MlflowException) and bool(
        re.search(r"API request to .* failed with (exception|error code 5\d\d)", str(exc)))


def _encode(op: str, run_id: str, **kw) -> dict:
    out: dict[str, Any] = {"op": op, "run_id": run_id}
    for k, v in kw.items():
        if k == "metrics":
            v = [[m.key, m.value, m.timestamp, m.step] for m in v]
        elif k in ("params", "tags"):
            v = [[x.key, x.value] for x in v]
        out[k] = v
    return out


_ALIASES: dict[str, str] = {}
"""Placeholder run id (``pending-...``, a run opened during an outage) -> the MLflow run created for it."""


def _apply(cfg: MLflowConfig, c, rec: dict, folder: Path | None = None) -> None:
    """Send one outbox record through ``cfg``'s MLflow client ``c``. A ``create_run`` record creates the run a folder
    opened during an outage, records its id in the folder's ``state.json`` and stands in for the placeholder from then
    on."""
    run_id, op = _ALIASES.get(rec["run_id"], rec["run_id"]), rec["op"]
    if op == "create_run":
        if run_id != rec["run_id"]:  # created already
            return
        exp_id = experiment_id(cfg.model_copy(update={"experiment": rec["experiment"]}))
        real = c.create_run(exp_id, run_name=rec["run_name"], tags=rec.get("tags") or {}).info.run_id
        params = [Param(k, v) for k, v in rec.get("params", [])]
        for i in range(0, len(params), 100):
            c.log_batch(real, params=params[i : i + 100])
        _ALIASES[rec["run_id"]] = real
        if folder is not None and (folder / "state.json").is_file():
            from medhybrid.core.files import write_json

            state = json.loads((folder / "state.json").read_text())
            if state.get("mlflow_run_id") == rec["run_id"]:
                write_json(folder / "state.json", {**state, "mlflow_run_id": real})
        log.info("created MLflow run %s for %s (opened while the tracking store was unreachable)", real, folder)
    elif op == "log_batch":
        c.log_batch(run_id, metrics=[Metric(*m) for m in rec.get("metrics", [])],
                    params=[Param(*x) for x in rec.get("params", [])], tags=[RunTag(*x) for x in rec.get("tags", [])])
    elif op == "log_artifact":
        c.log_artifact(run_id, rec["local_path"], rec.get("artifact_path"))
    elif op == "set_terminated":
        c.set_terminated(run_id, rec["status"], rec["end_time"])
    elif op == "update_run":
        c.update_run(run_id, status=rec["status"])
    else:
        raise ValueError(f"unknown outbox record {op!r}")


class Outbox:
    """The MLflow writes of one run folder that have not reached the server: ``<folder>/mlflow-outbox.jsonl``, one
    record per line, appended and synced to disk as they happen (a kill keeps all but a torn last line)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / OUTBOX

    def append(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a write torn by a kill: only ever the last line
                continue
        return out

    def keep(self, records: list[dict]) -> None:
        """Replace the outbox by ``records`` (atomically); an empty outbox is removed."""
        if records:
            with atomic_write(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            self.path.unlink(missing_ok=True)

    def send(self, cfg: MLflowConfig, c) -> int:
        """Send every record, in order, through ``cfg``'s client ``c``; the ones not sent stay. Returns how many were
        sent; an outage propagates."""
        records = self.records()
        for i, rec in enumerate(records):
            try:
                _apply(cfg, c, rec, self.path.parent)
            except Exception:
                self.keep(records[i:])
                raise
        self.keep([])
        return len(records)


_FOLDERS: dict[str, Path] = {}
"""MLflow run id -> the run folder whose outbox keeps its writes during an outage (:func:`bind`)."""
_OFFLINE_UNTIL: dict[str, float] = {}
"""Tracking URI -> monotonic time before which writes go straight to the outbox (no request) after an outage."""


def retry_after_s() -> float:
    """Seconds between tries of a server that did not answer (``MEDHYBRID_TRACKING_RETRY_S``, default 30)."""
    return float(os.environ.get("MEDHYBRID_TRACKING_RETRY_S", "30"))


def bind(run_id: str, folder: str | os.PathLike) -> None:
    """Route the writes of ``run_id`` through ``folder``'s :class:`Outbox` (done by :func:`medhybrid.core.runs.open_run`)."""
    _FOLDERS[run_id] = Path(folder)


def pending(folder: str | os.PathLike) -> int:
    """How many MLflow records of the run in ``folder`` are still waiting in its outbox."""
    return len(Outbox(folder).records())


def _send(cfg: MLflowConfig, rec: dict) -> None:
    """One write: earlier kept records first, then this one; kept in the outbox of the run's folder when the server
    cannot be reached (no request at all within :func:`retry_after_s` of the last failure). Unbound runs write
    directly."""
    uri = tracking_uri(cfg)
    folder = _FOLDERS.get(rec["run_id"])
    if folder is None:
        _apply(cfg, client(cfg), rec)
        return
    box = Outbox(folder)
    if time.monotonic() < _OFFLINE_UNTIL.get(uri, 0.0):
        box.append(rec)
        return
    try:
        c = client(cfg)
        if box.path.is_file() and (sent := box.send(cfg, c)):  # earlier records first
            log.info("MLflow tracking store %s answers again: sent the %d records kept in %s", uri, sent, box.path)
        _apply(cfg, c, rec)
    except Exception as e:
        if not is_outage(e):
            raise
        box.append(rec)
        if uri not in _OFFLINE_UNTIL:
            log.warning("MLflow tracking store %s cannot be reached (%s): training goes on, its records are kept in %s "
                        "and sent when the store answers again (or run: medhybrid sync %s)", uri, type(e).__name__,
                        box.path, folder)
        _OFFLINE_UNTIL[uri] = time.monotonic() + retry_after_s()


def open_run_later(cfg: MLflowConfig, folder: str | os.PathLike, run_name: str, tags: Mapping[str, str],
                   params: Mapping[str, Any] | None = None) -> str:
    """A run opened while the tracking store is unreachable: a placeholder id (``pending-...``) whose records, its
    creation first, wait in the folder's outbox; the MLflow run is created when they are sent."""
    import uuid

    run_id = f"pending-{uuid.uuid4().hex}"
    Outbox(folder).append({"op": "create_run", "run_id": run_id, "experiment": cfg.experiment, "run_name": run_name,
                           "tags": dict(tags), "params": [[k, str(v)[:6000]] for k, v in flatten(params or {}).items()]})
    bind(run_id, folder)
    log.warning("MLflow tracking store %s cannot be reached: run %s starts without it; its records wait in %s",
                tracking_uri(cfg), folder, Path(folder) / OUTBOX)
    return run_id


def flush(cfg: MLflowConfig, folder: str | os.PathLike) -> int:
    """Send the outbox of ``folder`` now (at the start and end of a run); an outage leaves it as it is. Returns how many
    records are still waiting."""
    box = Outbox(folder)
    if not box.path.is_file():
        return 0
    try:
        box.send(cfg, client(cfg))
        _OFFLINE_UNTIL.pop(tracking_uri(cfg), None)
    except Exception as e:
        if not is_outage(e):
            raise
    return pending(folder)


def sync(folder: str | os.PathLike) -> dict[str, int]:
    """Send every outbox under ``folder`` (a run, or an ablation with its runs) to the tracking URI its run recorded in
    ``state.json``. Returns ``{outbox folder: records still waiting}``; an unreachable store leaves them waiting."""
    out = {}
    for box in sorted(Path(folder).rglob(OUTBOX)):
        state_file = box.parent / "state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        uri = state.get("mlflow_tracking_uri")
        if not uri:
            raise ConfigError(f"{box.parent}: state.json names no MLflow tracking URI; cannot sync {box}")
        out[str(box.parent)] = flush(MLflowConfig(tracking_uri=uri), box.parent)
    return out


# ------------------------------------------------------------------------------------------ logging into a run
class _RunClient:
    """The MLflow client of a :class:`RunHandler`: its writes go through :func:`_send` (kept during an outage);
    anything else is the real client's."""

    def __init__(self, cfg: MLflowConfig):
        self._cfg = cfg
        self._client = mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))

    def __getattr__(self, name):
        return getattr(self._client, name)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **_) -> None:
        _send(self._cfg, _encode("log_batch", run_id, metrics=list(metrics), params=list(params), tags=list(tags)))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        _send(self._cfg, _encode("log_artifact", run_id, local_path=str(local_path), artifact_path=artifact_path))


class RunHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` bound to one existing MLflow run, given by id. MONAI's own handler finds its run by
    name (or makes one), which could pick another folder's unfinished run of the same name: a run folder owns exactly
    one MLflow run (:mod:`medhybrid.core.runs`), so the handler is told which. It reads nothing from the server and its
    writes are kept in the run folder's outbox while the server is down (:class:`_RunClient`)."""

    def __init__(self, run_id: str, cfg: MLflowConfig, evaluator: bool = False, **kwargs):
        super().__init__(tracking_uri=tracking_uri(cfg), experiment_name=cfg.experiment, **kwargs)
        self.run_id = run_id
        self.client = _RunClient(cfg)
        if evaluator:  # the run's parameters are the trainer's (an evaluator's max_epochs would contradict them)
            self.default_tracking_params = []

    def start(self, engine) -> None:
        if not self.cur_run:  # the run exists already (its folder opened it)
            self.cur_run = SimpleNamespace(info=SimpleNamespace(run_id=self.run_id))
        self._log_params({attr: getattr(engine.state, attr, None) for attr in self.default_tracking_params})


def engine_handler(cfg: MLflowConfig, run_id: str, evaluator: bool = False) -> MLFlowHandler:
    """MONAI's ``MLFlowHandler`` writing into the existing run ``run_id``: a trainer's loss every ``cfg.log_every``
    iterations and its epoch metrics, or (``evaluator``) an evaluator's metrics. With no ``global_epoch_transform``:
    MONAI's ``ValidationHandler`` runs the evaluator with the trainer's epoch as its own, so validation metrics are logged
    at the epoch they belong to. The run stays open (its owner finishes it)."""
    return RunHandler(run_id, cfg, evaluator, iteration_log=False if evaluator else (lambda e, it: it % cfg.log_every == 0),
                      output_transform=lambda o: {"loss": o["loss"].item()}, close_on_complete=False)


def finish_run(cfg: MLflowConfig, run_id: str, status: str = "FINISHED") -> None:
    _send(cfg, _encode("set_terminated", run_id, status=status, end_time=int(time.time() * 1000)))


def log_metrics(cfg: MLflowConfig, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    _send(cfg, _encode("log_batch", run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]))


def log_artifact(cfg: MLflowConfig, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    _send(cfg, _encode("log_artifact", run_id, local_path=str(Path(path).resolve()), artifact_path=artifact_path))


def reopen_run(cfg: MLflowConfig, run_id: str) -> None:
    _send(cfg, _encode("update_run", run_id, status="RUNNING"))


__all__ = ["bind", "check_reachable", "child_runs", "client", "engine_handler", "ensure_store", "experiment_id", "finish_run",
           "flatten", "flush", "is_outage", "log_artifact", "log_metrics", "MLflowConfig", "open_run_later", "OUTBOX",
           "Outbox", "pending", "reachable", "reopen_run", "retry_after_s", "RunHandler", "sync", "tracking_uri",
           "TrackingUnavailable"]
