"""MONAI Label's own bundle tasks for medhybrid bundles, with the few overrides they need, and next-sample strategies
that never give one study to two annotators at once.

- :class:`MedhybridInfer` is MONAI Label's ``BundleInferTask``: the bundle's ``preprocessing``, ``inferer`` and
  ``postprocessing`` run as declared (its ``postprocessing`` already maps the mask back to the study's pixel grid).
  Overridden: the label names (a one-channel sigmoid output is label 1, where MONAI Label would read channel 0 as
  the label value) and :meth:`MedhybridInfer.writer`, because MONAI Label's writer goes through ITK, which writes
  a 2D PNG mask transposed relative to medhybrid's readers and a DICOM study as NIfTI: a DICOM study gets a DICOM
  SEG referencing its UIDs, any other study a PNG of class indices.
- :class:`MedhybridTrain` is MONAI Label's ``BundleTrainTask`` running the bundle's ``train.json``. A bundle that
  adapts (``adapt: true``, the shipped default) checks itself on the saved labels: the served ``model.pt`` (offered
  first as the start) is replaced only when a fine-tune of it wins on held-out labels, and the train result and the
  log say what was decided and why (:func:`medhybrid.workflows.bundle.adapt_bundle`). Otherwise the weights offered to
  start from list ``pretrained.pt`` (the hybrid pretraining) first. Overridden too: the start is set on the bundle's
  own ``CheckpointLoader`` instead of adding a second one that it would override (training from scratch drops the
  bundle's WiSE-FT handler with it), and the studies nobody has labelled yet feed the bundle's semi-supervised recipe
  (``unlabelled_datalist``) beside the saved labels.
- :class:`LeasedRandom`, :class:`LeasedFirst` and :class:`LeasedUncertainty` rank the unlabelled studies and hand
  out the first one not leased to another annotator (:class:`medhybrid.label.workspace.StudyLeases`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from monai.transforms import SaveImaged
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import device_map

from medhybrid.data.dicom_seg import write_dicom_seg
from medhybrid.data.io import DataError, is_dicom_file
from medhybrid.data.transforms import SaveMask2D, SaveMask2Dd
from medhybrid.label.workspace import BundleNetwork, StudyLeases, adapt_outcome, train_request
from medhybrid.workflows.inference import score_files
from medhybrid.workflows.quality import UncertaintyConfig

log = logging.getLogger("medhybrid")


class MedhybridInfer(BundleInferTask):
    """MONAI Label's bundle infer task; results are a DICOM SEG for DICOM studies and a PNG otherwise."""

    def __init__(self, path: str, conf: dict[str, str], **kwargs):
        # the bundle's own mask writer is for `monai.bundle run`: the server writes through writer() below; MONAI
        # Label's own restore step is left out: the bundle's Invertd already maps the mask to the study's pixel grid
        # (a large study is read at reduced size, which that step would take for the study's size)
        super().__init__(path, conf, post_filter=[SaveImaged, SaveMask2Dd], load_strict=True, add_post_restore=False, **kwargs)
        if self.valid:
            self.labels = {str(k): int(v) for k, v in self.bundle_config.get("labels", {"foreground": 1}).items()}
            self.version = self.version or "0"

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        mask = data[self.output_label_key]
        source = data.get("image_path") or ""
        arr = mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask
        arr = (arr[0] if arr.ndim == 3 else arr).round().astype("uint8")
        labels = dict(self.labels)
        summary = {"label_names": labels, "shape": [int(s) for s in arr.shape],
                   "pixels": {n: int((arr == v).sum()) for n, v in labels.items()}}
        if isinstance(source, str) and os.path.isfile(source) and is_dicom_file(source) and extension in (None, "", ".dcm"):
            fd, out = tempfile.mkstemp(suffix=".dcm", prefix="medhybrid-seg-")
            os.close(fd)
            try:
                write_dicom_seg(arr, source, out, labels, algorithm=os.path.basename(self.bundle_path), version=str(self.version))
                return out, {**summary, "format": "DICOM SEG"}
            except DataError as e:  # a DICOM without the UIDs a SEG must reference: a PNG result instead
                os.remove(out)
                log.warning("no DICOM SEG for %s", e)
        folder = tempfile.mkdtemp(prefix="medhybrid-")
        saver = SaveMask2D(folder, postfix="", binary_png=False)
        saver(arr, source or "result.png")
        return saver.written[0], {**summary, "format": "PNG"}


class MedhybridTrain(BundleTrainTask):
    """MONAI Label's bundle train task. A bundle that adapts (``adapt: true``, both shipped ones) starts from the served
    ``model.pt`` (or from the weights an earlier adaptation started from: :func:`medhybrid.workflows.bundle.adapt_bundle`)
    and replaces it only when a fine-tune wins on the saved labels, on one device; with ``adapt`` off, training starts
    again from the bundle's pretraining (``pretrained.pt``) and always replaces the served model.

    A request's settings become ``monai.bundle`` overrides, where a ``$`` string is Python code: every setting is
    checked and typed here first (:func:`train_request`), and missing ones take :meth:`config`'s defaults."""

    def __call__(self, request, datastore: Datastore):
        # a fresh copy of train.json for each training: _load_checkpoint edits its handlers
        self.bundle_config = self._load_bundle_config(self.bundle_path, self.bundle_config_path)
        try:
            clean = train_request(request, self.config(), device_map())
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from e
        self._unlabelled = unlabelled_studies(datastore)
        self._wise = clean.get("wise")
        self._adapt = clean.get("adapt")
        if self._adapt and request.get("multi_gpu") not in (None, False, "false", "False"):
            log.info("train: adapting runs on one device (the bundle's multi-GPU training has no check)")
        started = time.time()
        result = super().__call__(clean, datastore) or {}
        outcome = adapt_outcome(self.bundle_path) if self._adapt else None
        if outcome is not None and (Path(self.bundle_path) / "eval" / "adapt" / "outcome.json").stat().st_mtime >= started:
            log.info("train: %s (%s): %s", "the served model was replaced" if outcome["replaced"] else
                     "the served model was kept", outcome["decision"], outcome["reason"])
            result = {**result, "adapt": outcome}
        return result

    def _update_overrides(self, overrides):
        """The unlabelled studies, as the bundle's ``unlabelled_datalist`` (read without masks, never scored), and the
        request's WiSE-FT weight as the bundle's ``wise``."""
        if "unlabelled_datalist" in self.bundle_config.config:
            overrides["unlabelled_datalist"] = list(getattr(self, "_unlabelled", []))
        if "wise" in self.bundle_config.config and getattr(self, "_wise", None) is not None:
            overrides["wise"] = self._wise
        if "adapt" in self.bundle_config.config and getattr(self, "_adapt", None) is not None:
            overrides["adapt"] = self._adapt
            if getattr(self, "_start", None):  # the weights the clinician chose to start from: the served ones by default
                overrides["adapt_start"] = self._start
        return overrides

    def config(self) -> dict[str, Any]:
        c = super().config()
        models = list(c.get("model_filename") or [])
        adapt = bool(self.bundle_config.config.get("adapt", False))
        first = "model.pt" if adapt else "pretrained.pt"  # the first one is the default start: the served model when
        if first in models:  # adapting (replaced only when a fine-tune of it wins on held-out labels), else the
            models.remove(first)  # pretraining, fine-tuned on every saved label
            models.insert(0, first)
        c.update(model_filename=models, max_epochs=4, val_split=0.2)
        if "wise" in self.bundle_config.config:  # the bundle's own WiSE-FT weight, offered as a setting
            c["wise"] = float(self.bundle_config.config["wise"])
        if "adapt" in self.bundle_config.config:  # self-checking adaptation, offered as a setting (the bundle's default)
            c["adapt"] = adapt
        return c

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        self._start = model_pytorch if pretrained and os.path.exists(model_pytorch) else None
        loaders = _handlers(train_handlers, "CheckpointLoader")
        if not loaders:
            return super()._load_checkpoint(model_pytorch, pretrained, train_handlers)
        if not pretrained:  # from scratch: the bundle's own loader goes too, and WiSE-FT, which would pull the
            train_handlers.remove(loaders[0])  # trained weights back towards a random start
            for h in _handlers(train_handlers, "medhybrid.engines.handlers.WiSEFT"):
                train_handlers.remove(h)
        elif os.path.exists(model_pytorch):
            loaders[0]["load_path"] = model_pytorch
            loaders[0]["strict"] = True
        else:  # the chosen file is missing: the bundle's own starting point
            log.warning("%s not found: training starts from %s", model_pytorch, loaders[0].get("load_path"))


def _handlers(train_handlers: list, target: str) -> list[dict]:
    """The handlers of a bundle config's list whose ``_target_`` is ``target``."""
    return [h for h in train_handlers if isinstance(h, dict) and h.get("_target_") == target]


def unlabelled_studies(datastore: Datastore) -> list[dict]:
    """``[{"image": path}, ...]`` of the studies without a final label, for semi-supervised training."""
    ids = sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL.value))
    return [{"image": datastore.get_image_uri(i)} for i in ids]


# --------------------------------------------------------------------------------------------- strategies
class _Leased(Strategy):
    """Rank the unlabelled studies (:meth:`rank`) and hand out the first one no other annotator holds."""

    def __init__(self, description: str, leases: StudyLeases):
        super().__init__(description)
        self.leases = leases

    def rank(self, ids: list[str], request: dict, datastore: Datastore) -> list[str]:
        raise NotImplementedError

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        ids = sorted(datastore.get_unlabeled_images(request.get("label_tag") or DefaultLabelTag.FINAL.value))
        if not ids:
            return None
        client = request.get("client_id") or request.get("user")
        choice = self.leases.assign(self.rank(ids, request, datastore), client, unlabelled=ids)
        if choice is None:
            log.info("next sample: all %d unlabelled studies are with other annotators", len(ids))
            return None
        return {"id": choice, "client_id": client or "anonymous", "unlabeled": len(ids)}


class LeasedRandom(_Leased):
    def __init__(self, leases: StudyLeases):
        super().__init__("Random study, never one another annotator holds", leases)

    def rank(self, ids, request, datastore):
        return random.sample(ids, len(ids))


class LeasedFirst(_Leased):
    def __init__(self, leases: StudyLeases):
        super().__init__("First study in name order, never one another annotator holds", leases)

    def rank(self, ids, request, datastore):
        return ids


class LeasedUncertainty(_Leased):
    """Most uncertain study first: disagreement of the network's masks across noise levels (:mod:`medhybrid.experiments.active`),
    under the served weights of the bundle named by the request's ``model`` (default: the first served). On the
    shipped target domains labelling in this order trained *worse* models than random order: use it to review the
    model's weakest predictions, ``random`` to choose training images. Scores are cached per weights and study."""

    def __init__(self, leases: StudyLeases, networks: dict[str, BundleNetwork], cfg: UncertaintyConfig | None = None):
        super().__init__("Most uncertain study first (masks across noise levels), never one another annotator holds", leases)
        self.networks, self.cfg = networks, cfg or UncertaintyConfig()
        self._scores: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def rank(self, ids, request, datastore):
        name = request.get("model") if request.get("model") in self.networks else next(iter(self.networks))
        bn = self.networks[name]
        net = bn.get()
        st = bn.model_path.stat()
        keys = {i: (name, st.st_mtime_ns, datastore.get_image_uri(i)) for i in ids}
        with self._lock:
            for i in ids:
                if keys[i] not in self._scores:
                    try:
                        self._scores[keys[i]] = score_files(net, bn.meta, [keys[i][2]], self.cfg)[0]
                    except DataError as e:  # one unreadable study must not block the others
                        log.warning("uncertainty strategy: skipped %s", e)
                        self._scores[keys[i]] = float("nan")
            scores = {i: self._scores[keys[i]] for i in ids}
        return sorted((i for i in ids if not math.isnan(scores[i])), key=lambda i: -scores[i])


__all__ = ["LeasedFirst", "LeasedRandom", "LeasedUncertainty", "MedhybridInfer", "MedhybridTrain",
           "unlabelled_studies"]
