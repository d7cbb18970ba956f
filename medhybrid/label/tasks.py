"""MONAI Label's infer task, train task and next-sample strategy for the medhybrid app, over
:class:`medhybrid.label.workspace.LabelWorkspace` (which does the work and is tested without MONAI Label).

Stock ``BundleInferTask`` runs the bundle's MONAI transforms and writes with ITK: for a 2D PNG it returns a float
image ITK cannot write as PNG, or a mask at the network's 64 px instead of the study's size. Here a study is read
by medhybrid's own readers (PNG, JPEG, BMP, DICOM incl. MONOCHROME1, NIfTI, NRRD), segmented with the model's
training preprocessing, and the logits are mapped back to the study's pixel grid before thresholding.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from medhybrid.active import UncertaintyConfig, most_uncertain
from medhybrid.config import ConfigError
from medhybrid.io import DICOM_SUFFIXES, NIFTI_SUFFIXES, SITK_SUFFIXES, DataError, file_suffix
from medhybrid.label.workspace import LabelWorkspace, TrainParams

log = logging.getLogger("medhybrid")

_GEOMETRY_SUFFIXES = (*DICOM_SUFFIXES, *NIFTI_SUFFIXES, *SITK_SUFFIXES)


def result_extension(image: str, requested: str | None = None) -> str:
    """The mask format for a study: what the request asks for, else PNG for raster studies and NIfTI (carrying
    the study's origin, spacing and direction) for DICOM, NIfTI and NRRD studies, so a viewer overlays it."""
    if requested:
        return requested if requested.startswith(".") else f".{requested}"
    return ".nii.gz" if file_suffix(image) in _GEOMETRY_SUFFIXES else ".png"


def _invalid(e: Exception) -> MONAILabelException:
    return MONAILabelException(MONAILabelError.INVALID_INPUT, str(e))


class MedhybridInfer(InferTask):
    """Segmentation of one 2D study; returns a mask file of the study's size and orientation (class indices)."""

    def __init__(self, workspace: LabelWorkspace):
        self.workspace = workspace
        super().__init__(type=InferType.SEGMENTATION, labels=workspace.labels(), dimension=2,
                         description=f"medhybrid 2D segmentation ({workspace.bundle.name})",
                         config={"result_extension": "", "device": workspace.device})

    def is_valid(self) -> bool:
        return self.workspace.model_path.is_file()

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict]:
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise _invalid(ValueError(f"infer needs an image path or datastore id, got {image!r}"))
        if os.path.isdir(image):
            raise _invalid(DataError(image, "a folder (DICOM series) is not a 2D study: give one DICOM file"))
        t0 = time.perf_counter()
        fd, out = tempfile.mkstemp(suffix=result_extension(image, request.get("result_extension")), prefix="medhybrid-")
        os.close(fd)
        try:
            path, summary = self.workspace.segment(image, out)
        except (DataError, ConfigError, ValueError) as e:
            os.remove(out)
            raise _invalid(e) from e
        summary["latencies"] = {"total": round(time.perf_counter() - t0, 3)}
        return str(path), summary


class MedhybridTrain(TrainTask):
    """Few-shot fine-tuning of the bundle's pretrained hybrid network on every saved (``final``) label; the next
    inference serves the new weights."""

    def __init__(self, workspace: LabelWorkspace):
        self.workspace = workspace
        super().__init__("medhybrid few-shot fine-tuning from the pretrained hybrid checkpoint on the saved labels")

    def config(self) -> dict[str, Any]:
        return {**TrainParams().model_dump(), "device": self.workspace.device}

    def stats(self) -> dict[str, Any]:
        history = self.workspace.history()
        return {"trainings": len(history), **(history[-1] if history else {})}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        tag = DefaultLabelTag.FINAL.value
        ids = sorted(datastore.get_labeled_images(label_tag=tag))
        pairs = [{"id": i, "image": datastore.get_image_uri(i), "label": datastore.get_label_uri(i, tag)} for i in ids]
        try:
            return self.workspace.train(pairs, TrainParams(**request))
        except (DataError, ConfigError, ValueError) as e:
            raise _invalid(e) from e


class UncertaintyStrategy(Strategy):
    """Next study = the unlabelled one whose mask changes most when the image is noised (:mod:`medhybrid.active`):
    the study the current model is most likely wrong on. Measured on the shipped target domains, labelling in this
    order trained *worse* models than random order (README, "MONAI Label"): use it to review the model's weakest
    predictions, and ``random`` to choose training images. Scores are cached per served model and image file, so only
    new studies are scored after the first call."""

    def __init__(self, workspace: LabelWorkspace, cfg: UncertaintyConfig | None = None):
        super().__init__("Most uncertain study first: disagreement of the hybrid network's masks across noise levels")
        self.workspace = workspace
        self.cfg = cfg or UncertaintyConfig()
        self._scores: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def scores(self, datastore: Datastore, ids: list[str]) -> dict[str, float]:
        model = self.workspace.model_path
        model_key = (str(model), model.stat().st_mtime_ns)
        keyed = {}
        for i in ids:
            uri = datastore.get_image_uri(i)
            keyed[i] = (model_key, uri, os.stat(uri).st_mtime_ns)
        with self._lock:
            todo = [i for i in ids if keyed[i] not in self._scores]
            if todo:
                uris = [keyed[i][1] for i in todo]
                try:
                    values = self.workspace.uncertainty(uris, self.cfg)
                except DataError:
                    values = []
                    for u in uris:  # one unreadable study must not block the others: score them one by one
                        try:
                            values.append(self.workspace.uncertainty([u], self.cfg)[0])
                        except DataError as e:
                            log.warning("uncertainty strategy: skipped %s", e)
                            values.append(float("nan"))
                self._scores.update({keyed[i]: v for i, v in zip(todo, values, strict=True)})
            return {i: self._scores[keyed[i]] for i in ids if not math.isnan(self._scores[keyed[i]])}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        ids = sorted(datastore.get_unlabeled_images(label_tag=DefaultLabelTag.FINAL.value))
        if not ids:
            return None
        scores = self.scores(datastore, ids)
        if not scores:
            return None
        best = most_uncertain(scores, 1)[0]
        return {"id": best, "score": scores[best], "ranked_by": "u", "model": str(self.workspace.model_path),
                "unlabeled": len(ids)}
