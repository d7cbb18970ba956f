"""The medhybrid MONAI Label app: serves medhybrid's MONAI bundles through MONAI Label's own bundle tasks.

    .venv-label/bin/monailabel start_server --app medhybrid/label --studies /path/to/studies \\
        --host 127.0.0.1 --port 8000 [--conf bundles /path/to/bundle,/path/to/other] [--conf workdir /path]

``--conf`` keys (all optional):

- ``bundles``: comma-separated bundle folders (default: every bundle in the repository's ``bundles/``, i.e.
  ``dermoscopy_lesion_segmentation`` and ``chest_xray_lung_segmentation``); read from local paths only.
- ``workdir``: where the served copies of the bundles (and so their retrained weights) and the study leases live
  (default: ``<studies>/.medhybrid``).
- ``lease_minutes``: how long a study handed to one annotator is withheld from the others (default 30).

Models: one infer task and one train task per bundle, named after the bundle folder. Next-sample strategies:
``random`` (listed first), ``first`` and ``uncertainty``; none gives a study another annotator holds.
Studies: 2D PNG, JPEG, BMP, TIFF, DICOM (single frame), NIfTI and NRRD files in the studies folder. A DICOM study's
result is a DICOM SEG referencing it, any other study's a PNG of class indices.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp

from medhybrid.core.config import ConfigError
from medhybrid.label.tasks import LeasedFirst, LeasedRandom, LeasedUncertainty, MedhybridInfer, MedhybridTrain
from medhybrid.label.workspace import BundleNetwork, StudyLeases, served_bundle

log = logging.getLogger("medhybrid")

STUDY_PATTERNS = ["*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff", "*.dcm", "*.dicom", "*.nii.gz", "*.nii", "*.nrrd"]
"""Study files the datastore lists (MONAI Label's defaults lack DICOM files)."""


def default_bundles(app_dir: str) -> list[Path]:
    """The bundles beside the app in a clone of the repository (``<repository>/bundles/*`` with an inference config,
    the app being ``<repository>/medhybrid/label``). An installed medhybrid has no bundles beside it (the wheel does not
    ship them): then a :class:`ConfigError` says to pass ``--conf bundles``."""
    app = Path(app_dir).resolve()
    root = app.parent.parent / "bundles"  # <repository>/bundles when app is <repository>/medhybrid/label
    found = sorted(p for p in root.glob("*") if (p / "configs" / "inference.json").is_file()) if root.is_dir() else []
    if not found:
        raise ConfigError(f"no MONAI bundles found in {root} (the default, for a clone of the medhybrid repository; an "
                          "installed medhybrid ships none): pass --conf bundles /path/to/bundle[,/path/to/other]")
    return found


class MedhybridApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = conf or {}
        remote = studies.startswith(("http://", "https://"))
        default_workdir = os.path.join(app_dir, "model", "medhybrid") if remote else os.path.join(studies, ".medhybrid")
        workdir = Path(conf.get("workdir") or default_workdir)
        sources = [Path(p) for p in conf["bundles"].split(",") if p.strip()] if conf.get("bundles") else default_bundles(app_dir)
        self.bundles = {p.resolve().name: served_bundle(p, workdir) for p in sources}
        self.leases = StudyLeases(workdir / "leases.json", ttl=60 * float(conf.get("lease_minutes", 30)))
        labels: dict[str, int] = {}
        infers = {name: MedhybridInfer(str(path), conf) for name, path in self.bundles.items()}
        for t in infers.values():
            labels.update(t.labels)
        self._infers_made = infers
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="medhybrid",
                         description="medhybrid 2D segmentation: " + ", ".join(self.bundles), version="1", labels=labels)

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        patterns = list(dict.fromkeys([*settings.MONAI_LABEL_DATASTORE_FILE_EXT, *STUDY_PATTERNS]))
        return LocalDatastore(self.studies, extensions=patterns, auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                              read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self):
        return dict(self._infers_made)

    def init_trainers(self):
        return {name: MedhybridTrain(str(path), self.conf) for name, path in self.bundles.items()}

    def init_strategies(self):
        networks = {name: BundleNetwork(path, "cpu") for name, path in self.bundles.items()}
        return {"random": LeasedRandom(self.leases), "first": LeasedFirst(self.leases),
                "uncertainty": LeasedUncertainty(self.leases, networks)}
