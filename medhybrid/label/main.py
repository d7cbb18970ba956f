"""The medhybrid MONAI Label app.

    .venv-label/bin/monailabel start_server --app medhybrid/label --studies /path/to/studies \\
        --host 127.0.0.1 --port 8000 [--conf bundle /path/to/bundle] [--conf workdir /path] [--conf device cpu]

``--conf`` keys (all optional):

- ``bundle``: the medhybrid bundle to serve (default: the repository's ``bundles/medhybrid_2d_segmentation``);
  read from the local path only, nothing is downloaded.
- ``pretrained``: the checkpoint training starts from (default: the bundle's ``models/pretrained.pt``, else
  ``runs/pretrain-hybrid/model.pt``).
- ``workdir``: where trained weights, training runs and their MLflow store go (default: ``<studies>/.medhybrid``).
- ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` ...

Models: infer and train task ``medhybrid``; next-sample strategies ``random`` (listed first), ``uncertainty``, ``first``.
Studies: 2D PNG, JPEG, BMP, TIFF, DICOM (single frame), NIfTI and NRRD files in the studies folder.
"""

from __future__ import annotations

import logging
import os

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from medhybrid.label.tasks import MedhybridInfer, MedhybridTrain, UncertaintyStrategy
from medhybrid.label.workspace import LabelWorkspace

log = logging.getLogger("medhybrid")

STUDY_PATTERNS = ["*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff", "*.dcm", "*.dicom", "*.nii.gz", "*.nii", "*.nrrd"]
"""Study files the datastore lists (MONAI Label's defaults lack DICOM files)."""

MODEL = "medhybrid"


class MedhybridApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = conf or {}
        remote = studies.startswith(("http://", "https://"))
        workdir = conf.get("workdir") or (os.path.join(app_dir, "model", "medhybrid") if remote else os.path.join(studies, ".medhybrid"))
        self.workspace = LabelWorkspace(conf.get("bundle"), workdir, conf.get("pretrained"), conf.get("device", "auto"))
        meta = self.workspace.metadata
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="medhybrid",
                         description=meta.get("description", "medhybrid 2D segmentation"), version=meta.get("version", "0"),
                         labels=self.workspace.labels())

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        patterns = list(dict.fromkeys([*settings.MONAI_LABEL_DATASTORE_FILE_EXT, *STUDY_PATTERNS]))
        return LocalDatastore(self.studies, extensions=patterns, auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                              read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self):
        return {MODEL: MedhybridInfer(self.workspace)}

    def init_trainers(self):
        return {MODEL: MedhybridTrain(self.workspace)}

    def init_strategies(self):
        # random first (what the UIs preselect): on the shipped target domains it trained better models than labelling
        # the most uncertain studies first; uncertainty finds the studies the model is most likely wrong on
        return {"random": Random(), "uncertainty": UncertaintyStrategy(self.workspace), "first": First()}
