"""What the MONAI Label app needs beside MONAI Label's own bundle tasks, testable without MONAI Label:

- :func:`served_bundle`: the copy of a bundle that the server serves and retrains. MONAI Label's bundle train task
  writes the trained weights into the bundle it serves (``models/model.pt``), so the app serves a copy in its
  working folder (by default ``<studies>/.medhybrid/bundles/<name>``) and the shipped bundle stays as it is.
- :class:`BundleNetwork`: a bundle's ``network_def`` with its current ``models/model.pt``, reloaded when the file
  changes (a training finishes in another process), for the uncertainty strategy.
- :class:`StudyLeases`: which annotator was handed which study, so that two annotators are never given the same
  study at once. Leases expire (default 30 min), are released when the study gets a label or the annotator asks
  for the next one, and persist in the working folder across server restarts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from medhybrid.core.config import ConfigError
from medhybrid.core.files import atomic_write, write_json
from medhybrid.networks.checkpoints import NOTE_SUFFIX
from medhybrid.workflows.inference import bundle_segmenter

log = logging.getLogger("medhybrid")

BUNDLE_FILES = ("configs", "models", "docs", "LICENSE")
"""What :func:`served_bundle` copies (not a bundle's run folders or evaluation outputs)."""


def pick_device(name: str | None) -> str:
    """``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``), or the CPU with a warning when it asks for CUDA and there
    is none: MONAI Label's UIs send ``cuda`` by default."""
    name = (name or "auto").strip() or "auto"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r asked for, but CUDA is not available: using the CPU", name)
        return "cpu"
    return name


def check_bundle(path: str | os.PathLike) -> Path:
    """``path`` if it is a servable bundle (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``),
    else :class:`ConfigError` saying what is missing."""
    p = Path(path).resolve()
    missing = [f for f in ("configs/inference.json", "configs/metadata.json", "models/model.pt") if not (p / f).is_file()]
    if missing:
        raise ConfigError(f"{p}: not a servable bundle, missing {', '.join(missing)}")
    return p


LEARNT = ("model.pt", "model.pt" + NOTE_SUFFIX, "model.base.pt", "model.base.pt" + NOTE_SUFFIX)
"""A served copy's own files in ``models/``, never refreshed from the source: the served weights and their note, and
the weights they were adapted from (:func:`medhybrid.workflows.bundle.adapt_bundle`) with theirs."""


def served_bundle(source: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """The copy of the bundle ``source`` that the server serves: ``<workdir>/bundles/<name>``, made on first use.
    An existing copy keeps its trained ``models/model.pt`` (and :data:`LEARNT`); its configs and other weights (``pretrained.pt``) are
    refreshed from ``source`` when those change, so a bundle update reaches the server without losing what it
    learnt. (If an update changes the network, the served ``model.pt`` no longer loads strictly and the server says
    so: delete it to serve the bundle's.)"""
    src = check_bundle(source)
    dst = Path(workdir).resolve() / "bundles" / src.name
    if not dst.exists():
        with atomic_write(dst) as tmp:  # a copy cut short (a kill) never looks like a served bundle
            tmp.mkdir()
            for name in BUNDLE_FILES:
                s = src / name
                if s.is_dir():
                    shutil.copytree(s, tmp / name)
                elif s.is_file():
                    shutil.copy2(s, tmp / name)
        log.info("medhybrid label: serving a copy of %s in %s", src, dst)
        return dst
    for s in sorted((src / "configs").rglob("*")):
        d = dst / "configs" / s.relative_to(src / "configs")
        if s.is_file() and (not d.is_file() or d.read_bytes() != s.read_bytes()):
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, d)
    for s in (src / "models").glob("*"):
        d = dst / "models" / s.name
        if s.is_file() and s.name not in LEARNT and (not d.is_file() or d.read_bytes() != s.read_bytes()):
            shutil.copy2(s, d)
    return dst


class BundleNetwork:
    """A bundle's ``network_def`` loaded with its ``models/model.pt``; :meth:`get` reloads when the file changes.

    :attr:`meta` describes the preprocessing in medhybrid's terms (:class:`medhybrid.data.specs.Preprocess`), read from
    the bundle's ``image_channels``, ``resolution`` and ``intensity`` ids."""

    def __init__(self, bundle: str | os.PathLike, device: str = "cpu"):
        self.bundle = check_bundle(bundle)
        self.device = torch.device(pick_device(device))
        self._lock = threading.Lock()
        self._cache: tuple[tuple, torch.nn.Module] | None = None
        self.meta: dict = {}
        self.get()

    @property
    def model_path(self) -> Path:
        return self.bundle / "models" / "model.pt"

    def get(self) -> torch.nn.Module:
        st = self.model_path.stat()
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._cache is None or self._cache[0] != key:
                net, self.meta = bundle_segmenter(self.bundle)
                self._cache = (key, net.to(self.device).eval())
            return self._cache[1]


class StudyLeases:
    """Studies handed out to annotators (``client_id``), one study per annotator at a time, in ``path`` (JSON).

    :meth:`assign` picks the first study of a ranked list that no other annotator holds, leases it to the caller
    (releasing the caller's previous lease) and returns it; under one lock, so concurrent requests never get the
    same study. A lease lasts ``ttl`` seconds."""

    def __init__(self, path: str | os.PathLike, ttl: float = 1800.0):
        self.path, self.ttl = Path(path), float(ttl)
        self._lock = threading.Lock()
        self._leases: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self._leases = {str(k): dict(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError) as e:
                log.warning("%s: unreadable study leases, starting afresh (%s)", self.path, e)

    def _prune(self, now: float, unlabelled: set[str] | None) -> None:
        self._leases = {s: v for s, v in self._leases.items()
                        if now - float(v.get("ts", 0)) < self.ttl and (unlabelled is None or s in unlabelled)}

    def held(self, now: float | None = None) -> dict[str, str]:
        """Study -> annotator, for the leases still running."""
        with self._lock:
            self._prune(time.time() if now is None else now, None)
            return {s: v["client_id"] for s, v in self._leases.items()}

    def assign(self, ranked: Iterable[str], client_id: str | None, unlabelled: Iterable[str] | None = None,
               now: float | None = None) -> str | None:
        """The first of ``ranked`` not leased to another annotator, now leased to ``client_id`` (``None`` is one
        anonymous annotator); None when every study is taken. ``unlabelled`` (the studies still without a label)
        releases the leases of the others."""
        client = str(client_id or "anonymous")
        now = time.time() if now is None else now
        open_ = None if unlabelled is None else set(unlabelled)
        with self._lock:
            self._prune(now, open_)
            taken = {s for s, v in self._leases.items() if v["client_id"] != client}
            choice = next((s for s in ranked if s not in taken and (open_ is None or s in open_)), None)
            if choice is None:
                return None
            self._leases = {s: v for s, v in self._leases.items() if v["client_id"] != client}
            self._leases[choice] = {"client_id": client, "ts": now}
            write_json(self.path, self._leases, indent=1)
            return choice


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def adapt_outcome(bundle: str | os.PathLike) -> dict[str, Any] | None:
    """What the last self-checking training of ``bundle`` decided (``eval/adapt/outcome.json``, written by
    :func:`medhybrid.workflows.bundle.adapt_bundle`): ``{"decision", "reason", "replaced", "start", "labels"}``, or None
    when it has not adapted."""
    path = Path(bundle) / "eval" / "adapt" / "outcome.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    return {k: r[k] for k in ("decision", "reason", "replaced", "start", "labels")}


def train_request(request: dict[str, Any], defaults: dict[str, Any],
                  devices: dict[str, str] | None = None) -> dict[str, Any]:
    """The settings of a MONAI Label ``/train`` request, typed and checked, missing ones from ``defaults`` (the train
    task's config; a list default is its first item); ``devices`` maps the GPU names the server lists to
    ``cuda:N``. The settings become ``monai.bundle`` overrides, where a ``$`` string is Python code: anything that
    is not the plain value it should be is refused with :class:`ValueError`."""

    def pick(key):
        v = request.get(key, defaults.get(key))
        return v[0] if isinstance(v, list) and v else v

    def flag(key) -> bool:
        v = pick(key)
        return v.strip().lower() in ("1", "true", "yes") if isinstance(v, str) else bool(v)

    models = [m for m in defaults.get("model_filename") or [] if isinstance(m, str)]
    device = str(pick("device") or "cpu")
    device = (devices or {}).get(device, device)  # the UI offers GPU names ("NVIDIA H100:1")
    if not _DEVICE.match(device):
        raise ValueError(f"device {device!r}: give cpu, cuda, cuda:N or a GPU name the server lists")
    model_filename = str(pick("model_filename") or (models[0] if models else "model.pt"))
    if models and model_filename not in models:
        raise ValueError(f"model_filename {model_filename!r}: one of {models}")
    gpus = str(pick("gpus") or "all")
    if gpus != "all" and not re.fullmatch(r"\d+(,\d+)*", gpus):
        raise ValueError(f"gpus {gpus!r}: 'all' or GPU indices such as 0,1")
    tracking = str(pick("tracking") or "None")
    if tracking not in ("None", "none", "mlflow"):
        raise ValueError(f"tracking {tracking!r}: None or mlflow")
    out: dict[str, Any] = {
        "model": str(request.get("model") or ""), "device": device, "model_filename": model_filename, "gpus": gpus,
        "max_epochs": int(pick("max_epochs")), "val_split": float(pick("val_split")),
        "pretrained": flag("pretrained"), "multi_gpu": flag("multi_gpu"), "tracking": tracking,
        "run_id": "run",
    }
    if out["max_epochs"] < 1 or not -1.0 <= out["val_split"] < 1.0:
        raise ValueError(f"max_epochs {out['max_epochs']} must be >= 1 and val_split {out['val_split']} in [-1, 1)")
    if pick("wise") is not None:  # the bundle's WiSE-FT weight (train.json's "wise"): 1 keeps the trained weights
        try:
            out["wise"] = float(pick("wise"))
        except (TypeError, ValueError):
            raise ValueError(f"wise {pick('wise')!r}: a number in [0, 1]") from None
        if not 0.0 <= out["wise"] <= 1.0:
            raise ValueError(f"wise {out['wise']}: a number in [0, 1] (1 keeps the trained weights)")
    if pick("adapt") is not None:  # the bundle's self-checking adaptation (train.json's "adapt"), a yes or no
        out["adapt"] = flag("adapt")
    if out.get("adapt"):
        if not out["pretrained"]:
            raise ValueError("adapt starts from trained weights (model_filename) and keeps them unless a fine-tune of "
                             "them wins: training from scratch (pretrained false) needs adapt false")
        # the bundle's multi-GPU training (multi_gpu_train.json) trains without the check: adapting runs on one device
        out["multi_gpu"] = False
    for key in ("tracking_uri", "tracking_experiment_name", "tracking_run_name"):
        v = request.get(key)
        if v:
            if not isinstance(v, str) or v.lstrip()[:1] in ("$", "@", "%"):
                raise ValueError(f"{key} {v!r}: a plain string")
            out[key] = v
    return out


__all__ = ["BUNDLE_FILES", "BundleNetwork", "check_bundle", "pick_device", "served_bundle", "StudyLeases",
           "train_request"]
