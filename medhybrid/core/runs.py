"""A run's folder: its identity (the config hash), its ``state.json`` and its lifecycle.

Every run (a pretraining, a fine-tune, a DDPM-features head) owns one folder. :func:`claim_folder` refuses a folder
that holds a run of another configuration, ``state.json`` records the status, the MLflow run id and what the run
produced (written atomically), and :func:`open_run` / :func:`failing_marks` / :func:`close_run` keep the folder and
its MLflow run (:mod:`medhybrid.core.tracking`) in step, so a killed run resumes into the same MLflow run and two runs
never merge.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Param

from medhybrid.core import tracking
from medhybrid.core.config import ConfigError, StrictModel, dump_config, save_config
from medhybrid.core.files import write_json
from medhybrid.core.tracking import MLflowConfig

log = logging.getLogger("medhybrid")


class RunStopped(BaseException):
    """A run stopped on request (SIGTERM or SIGINT) after writing a checkpoint: the same command resumes it. Like
    ``KeyboardInterrupt`` it is not an ``Exception``: an ablation stops with it instead of going on to the next run."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at iteration {iteration}, checkpoint {checkpoint}: "
                         "run the same command to resume")


EXECUTION_ONLY = {"train": ("progress", "compile", "threads"), "unlabelled": ("cache", "cache_dir", "memory_limit_mb")}
"""Per config section, the fields that decide how a run executes (threads, progress, caches), not what it computes."""


def config_hash(cfg: StrictModel, exclude: tuple[str, ...] = ("mlflow", "output_dir")) -> str:
    """The identity of a run: a hash of its resolved config without the fields in ``exclude`` and the
    :data:`EXECUTION_ONLY` ones. A run folder belongs to one hash (:func:`claim_folder`)."""
    d = {k: v for k, v in dump_config(cfg).items() if k not in exclude}
    for section, fields in EXECUTION_ONLY.items():
        for f in fields:
            (d.get(section) or {}).pop(f, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def read_state(folder: Path) -> dict:
    """The run's ``state.json`` ({} for a new folder)."""
    p = Path(folder) / "state.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def scores(state: dict) -> tuple[str | None, dict]:
    """``(scored_on, scores)`` of an evaluated run's ``state.json``: the set it was scored on (``test``, ``dev``) and its
    summary (``test_dice`` ...). Folders written before the set was recorded hold ``"test": {...}``: test scores.
    ``(None, {})`` for a run not evaluated."""
    if not state.get("evaluated"):
        return None, {}
    if "scores" in state:
        return state.get("scored_on", "test"), state["scores"]
    return "test", state.get("test", {})


def write_state(folder: Path, **updates) -> dict:
    """Update ``state.json`` atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = read_state(folder)
    state.update(updates)
    write_json(folder / "state.json", state)
    return state


def claim_folder(folder: Path, run_hash: str) -> dict:
    """Create ``folder`` and return its ``state.json``; refuse (ConfigError) a folder holding a run of
    another configuration, so two runs never share a folder, checkpoints or an MLflow run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = read_state(folder)
    if state.get("config_hash") and state["config_hash"] != run_hash:
        raise ConfigError(f"{folder} holds a run of a different configuration (hash {state['config_hash']} != {run_hash}); "
                          "choose another output_dir or remove that folder")
    return state


def open_run(cfg: MLflowConfig, folder: Path, run_name: str, params: Mapping[str, Any] | None = None,
             tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """The MLflow run of the run in ``folder``: reopened if ``state.json`` names one, else created
    (with ``params`` and ``tags``) and recorded there. Records the folder kept during an earlier outage are sent first.
    An unreachable tracking store at the start of a command stops it here, in one line
    (:class:`~medhybrid.core.tracking.TrackingUnavailable`), before anything trains; once the command has reached it, an
    outage opens the run later (:func:`~medhybrid.core.tracking.open_run_later`) and training goes on."""
    online = tracking.reachable(cfg)
    state = read_state(folder)
    run_id = state.get("mlflow_run_id")
    if run_id:
        tracking.bind(run_id, folder)
        tracking.flush(cfg, folder)
        tracking.reopen_run(cfg, run_id)
        return run_id
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags["medhybrid.folder"] = str(Path(folder).resolve())
    if not online:  # an outage during a command that started with its store: the run is created once it answers
        run_id = tracking.open_run_later(cfg, folder, run_name, all_tags, params)
        write_state(folder, mlflow_run_id=run_id, mlflow_tracking_uri=tracking.tracking_uri(cfg))
        return run_id
    c = tracking.client(cfg)
    run = c.create_run(tracking.experiment_id(cfg), run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    if params:
        flat = [Param(k, str(v)[:6000]) for k, v in tracking.flatten(params).items()]
        for i in range(0, len(flat), 100):
            c.log_batch(run_id, params=flat[i : i + 100])
    write_state(folder, mlflow_run_id=run_id, mlflow_tracking_uri=tracking.tracking_uri(cfg))
    tracking.bind(run_id, folder)
    return run_id


@contextlib.contextmanager
def failing_marks(cfg: MLflowConfig, folder: Path, run_id: str | None):
    """On any exception in the body (a kill included): the MLflow run ends FAILED and the folder's state
    says ``failed``; after a graceful stop (:class:`~medhybrid.core.runs.RunStopped`: SIGTERM, SIGINT) it ends KILLED and
    the state says ``stopped``. The exception propagates. Re-running the same config resumes the same run."""
    try:
        yield
    except RunStopped:
        if run_id:
            tracking.finish_run(cfg, run_id, "KILLED")
        write_state(folder, status="stopped")
        raise
    except BaseException:
        if run_id:
            tracking.finish_run(cfg, run_id, "FAILED")
        write_state(folder, status="failed")
        raise


def close_run(cfg: MLflowConfig, folder: Path, run_id: str | None, artifacts: list[Path], **state) -> None:
    """Log ``artifacts``, end the MLflow run FINISHED and mark the folder finished (with ``state``)."""
    if run_id:
        for a in artifacts:
            tracking.log_artifact(cfg, run_id, a)
        tracking.finish_run(cfg, run_id)
        if tracking.flush(cfg, folder):
            log.warning("%s: finished, but %d MLflow records wait in %s: run `medhybrid sync %s` once the tracking server "
                        "answers", folder, tracking.pending(folder), Path(folder) / tracking.OUTBOX, folder)
    write_state(folder, status="finished", **state)


class FolderInUse(ConfigError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder (``<folder>/.lock``, ``fcntl.flock``), naming its holder: PID, host and start
    time are written into the file. The operating system drops the lock when the holder's process ends, however it
    ends (a kill included), so a lock never outlives its run; nothing has to clean it up."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._fh = None

    def acquire(self, wait: bool | None = None) -> None:
        """Take the lock, or raise :class:`FolderInUse` at once naming the holder; with ``wait`` (default: the
        ``MEDHYBRID_WAIT_FOR_FOLDER`` environment variable, set by ``medhybrid --wait``) block until the holder ends."""
        if wait is None:
            wait = os.environ.get("MEDHYBRID_WAIT_FOR_FOLDER", "") not in ("", "0")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                who = json.loads(fh.read() or "{}")
            except ValueError:
                who = {}
            if wait:
                log.info("%s is in use by process %s on %s: waiting for it to end", self.path.parent, who.get("pid", "?"),
                         who.get("host", "?"))
                fcntl.flock(fh, fcntl.LOCK_EX)
                self._hold(fh)
                return
            fh.close()
            raise FolderInUse(f"{self.path.parent} is in use by process {who.get('pid', '?')} on {who.get('host', '?')} "
                              f"(started {who.get('started', '?')}): one run per folder at a time; wait for it to end, "
                              "or stop that process, then run again (it resumes), or pass --wait") from None
        self._hold(fh)

    def _hold(self, fh) -> None:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            if not self._fh.closed:
                fcntl.flock(self._fh, fcntl.LOCK_UN)
                self._fh.close()
            self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None


@contextlib.contextmanager
def experiment(folder: Path, mlflow: MLflowConfig, run_name: str, params: Mapping[str, Any] | None = None,
               tags: Mapping[str, str] | None = None):
    """The lifecycle of an experiment's own folder (an ablation, an active-learning run), which holds runs rather than a
    model: the folder's :class:`RunLock` for the whole body, its MLflow parent run opened (yielded; None with MLflow
    off) and marked FAILED, or KILLED after a graceful stop, when the body raises. The body finishes the run."""
    lock = RunLock(folder)
    lock.acquire()
    try:
        parent = open_run(mlflow, folder, run_name, params=params, tags=tags) if mlflow.enabled else None
        with failing_marks(mlflow, folder, parent):
            yield parent
    finally:
        lock.release()


class Run:
    """The one lifecycle of every run (pretraining, fine-tuning, DDPM-features head, nnU-Net) in its folder, as one
    context manager::

        with Run.claim(folder, run_hash, cfg.mlflow) as run:  # the folder's lock; refuses another configuration
            if run.finished:                                  # finished, with its product (model.pt): nothing to do
                return ...run.state...
            run.start(cfg, run_name, params, tags)            # config.yaml, state.json "running", the MLflow run
            ...train, write model.pt...
            run.finish(artifacts, metrics=...)                # artifacts logged, both marked finished

    Leaving the block releases the lock, in this one place, however it is left. An exception after :meth:`start`
    (a kill included) marks the folder and its MLflow run failed (stopped and KILLED after a graceful stop,
    :class:`RunStopped`) and propagates; re-running the same configuration resumes into the same folder and MLflow
    run. While the block runs, a second process claiming the same folder (the same command started twice, two
    ablations with one output folder) stops at once with :class:`FolderInUse`, naming the holder. The MLflow writes
    behind it go through the run folder's outbox (:mod:`medhybrid.core.tracking`) while the server is down."""

    def __init__(self, folder: Path, run_hash: str, mlflow: MLflowConfig, state: dict, lock: RunLock | None = None,
                 product: str = "model.pt"):
        self.folder, self.run_hash, self.mlflow, self.state = Path(folder), run_hash, mlflow, state
        self.run_id: str | None = state.get("mlflow_run_id")
        self.lock = lock
        self.product = product
        self.started = self.closed = False

    @classmethod
    def claim(cls, folder: Path, run_hash: str, mlflow: MLflowConfig, product: str = "model.pt") -> Run:
        """Claim ``folder``: take its lock and refuse a folder holding another configuration. ``product``: the file,
        relative to the folder, whose presence beside a finished state means there is nothing left to do
        (``model.pt`` for a trained network). Use the result as a context manager."""
        lock = RunLock(folder)
        lock.acquire()
        try:
            return cls(folder, run_hash, mlflow, claim_folder(folder, run_hash), lock, product)
        except BaseException:
            lock.release()
            raise

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is not None and self.started and not self.closed:
                stopped = isinstance(exc, RunStopped)
                if self.run_id:
                    tracking.finish_run(self.mlflow, self.run_id, "KILLED" if stopped else "FAILED")
                write_state(self.folder, status="stopped" if stopped else "failed")
        finally:
            if self.lock is not None:
                self.lock.release()
        return False

    @property
    def finished(self) -> bool:
        return self.state.get("status") == "finished" and (self.folder / self.product).is_file()

    def start(self, cfg: StrictModel, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, parent_run_id: str | None = None, **state) -> str | None:
        """Write the resolved ``config.yaml`` and ``state.json`` (running, with ``state``), then open (or reopen) the
        MLflow run when tracking is on. Returns the MLflow run id (None with MLflow off)."""
        save_config(cfg, self.folder / "config.yaml")
        write_state(self.folder, config_hash=self.run_hash, status="running", **state)
        self.run_id = open_run(self.mlflow, self.folder, run_name, params=params, tags=tags,
                               parent_run_id=parent_run_id) if self.mlflow.enabled else None
        self.started = True
        return self.run_id

    def finish(self, artifacts: list[Path], **state) -> None:
        """:func:`close_run` for this run: artifacts logged, the folder and its MLflow run marked finished."""
        close_run(self.mlflow, self.folder, self.run_id, artifacts, **state)
        self.closed = True


__all__ = ["claim_folder", "close_run", "config_hash", "EXECUTION_ONLY", "experiment", "failing_marks", "open_run", "read_state",
           "Run", "RunLock", "FolderInUse", "scores", "write_state"]
