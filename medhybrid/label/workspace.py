"""What the MONAI Label app does, without MONAI Label: serve a bundle's model, segment a study into a mask file
of the study's size and orientation, fine-tune from the clinician's saved labels, rank unlabelled studies.

A :class:`LabelWorkspace` joins a medhybrid bundle (read-only: ``configs/metadata.json``, ``models/model.pt``,
``models/pretrained.pt`` or ``runs/pretrain-hybrid/model.pt``) and a writable folder (by default ``<studies>/.medhybrid``) holding what the
app learns from those studies::

    model.pt            the served weights once a training has finished (else the bundle's models/model.pt)
    runs/train-*/       one folder per training: datalist.csv, the few-shot fine-tuning run, validation
    mlflow.db           one MLflow run per training (experiment ``medhybrid-label``)
    history.json        what each training used and measured

The served model is reloaded whenever ``model.pt`` changes on disk, so a training finished in another process
(MONAI Label trains in a subprocess) is used by the next inference.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from medhybrid.config import REPO_ROOT, ConfigError
from medhybrid.io import DataError, file_suffix
from medhybrid.tracking import write_json

log = logging.getLogger("medhybrid")

DEFAULT_BUNDLE = REPO_ROOT / "bundles" / "medhybrid_2d_segmentation"
"""The bundle served when the app is given none: the repository's own (weights from scripts/build_bundle_weights.sh)."""

PIL_MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


class TrainParams(BaseModel):
    """What a ``/train`` request may set (MONAI Label's UI sends the train task's config back, with keys of its own
    such as ``model``, ``name`` or ``gpus``: those are ignored)."""

    model_config = ConfigDict(extra="ignore")

    max_iterations: int = Field(0, ge=0, description="0: medhybrid's few-shot schedule for the number of labels "
                                "(20 per label, 100..400)")
    val_split: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of the labelled studies held out to validate "
                             "(floor; none while it rounds to 0)")
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    device: str = Field("auto", description="auto, cpu, cuda ...; cuda falls back to the CPU when there is no GPU")


def pick_device(name: str | None) -> str:
    """``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``), or the CPU with a warning when it asks for CUDA and there
    is none: MONAI Label's UIs send ``cuda`` by default."""
    name = (name or "auto").strip() or "auto"
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r asked for, but CUDA is not available: using the CPU", name)
        return "cpu"
    return name


def write_label(mask: np.ndarray, reference: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the (H, W) class-index ``mask`` of the image ``reference`` to ``path``: PNG (or BMP/TIFF) as 8-bit grey
    holding the class indices; any other format SimpleITK writes (``.nii.gz``, ``.nrrd``, ``.mha``) with the
    reference's origin, spacing and direction when SimpleITK can read the reference (DICOM, NIfTI, NRRD)."""
    path = Path(path)
    mask = np.ascontiguousarray(mask.astype(np.uint8))
    if file_suffix(path) in PIL_MASK_SUFFIXES:
        from PIL import Image

        Image.fromarray(mask, mode="L").save(path)
        return path
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask)
    try:
        ref = sitk.ReadImage(str(reference))
    except RuntimeError:
        ref = None
    if ref is not None and tuple(ref.GetSize()[:2]) == (mask.shape[1], mask.shape[0]):
        if ref.GetDimension() == 3 and ref.GetSize()[2] == 1:
            img = sitk.GetImageFromArray(mask[None])
        if ref.GetDimension() == img.GetDimension():
            img.CopyInformation(ref)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


class LabelWorkspace:
    """A bundle served for one studies folder, and what was learnt there (see the module docstring)."""

    def __init__(self, bundle: str | os.PathLike | None, workdir: str | os.PathLike, pretrained: str | os.PathLike | None = None,
                 device: str = "auto"):
        self.bundle = Path(bundle or DEFAULT_BUNDLE).resolve()
        self.metadata_file = self.bundle / "configs" / "metadata.json"
        if not self.metadata_file.is_file():
            raise ConfigError(f"{self.bundle}: not a medhybrid bundle (no configs/metadata.json)")
        self.bundle_model = self.bundle / "models" / "model.pt"
        if not self.bundle_model.is_file():
            raise ConfigError(f"{self.bundle_model} not found: the bundle has no weights; build them with "
                              "scripts/build_bundle_weights.sh (or copy a fine-tuned model.pt there)")
        self.pretrained = Path(pretrained).resolve() if pretrained else self._bundle_pretrained()
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(device)
        self.metadata = json.loads(self.metadata_file.read_text())
        self._lock = threading.Lock()
        self._cache: tuple[tuple, torch.nn.Module, dict] | None = None

    def _bundle_pretrained(self) -> Path:
        """The bundle's hybrid pretraining: ``models/pretrained.pt`` (published by scripts/build_bundle_weights.sh),
        else the pretraining run itself (``runs/pretrain-hybrid/model.pt``)."""
        published = self.bundle / "models" / "pretrained.pt"
        return published if published.is_file() else self.bundle / "runs" / "pretrain-hybrid" / "model.pt"

    # ----------------------------------------------------------------------------------------- the served model
    @property
    def trained_model(self) -> Path:
        return self.workdir / "model.pt"

    @property
    def model_path(self) -> Path:
        """The weights served now: the last training's, else the bundle's."""
        return self.trained_model if self.trained_model.is_file() else self.bundle_model

    def load(self):
        """``(Segmenter, meta)`` of :attr:`model_path`, reloaded when that file changes."""
        from medhybrid.inference import load_segmenter

        path = self.model_path
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._cache is None or self._cache[0] != key:
                net, meta = load_segmenter(path, self.device)
                self._cache = (key, net, meta)
                log.info("medhybrid label: serving %s (%s, %s)", path, meta.get("mode"), meta.get("dataset"))
            return self._cache[1], self._cache[2]

    def labels(self) -> dict[str, int]:
        """Label name -> class index, from the bundle's metadata (``network_data_format.outputs.pred.channel_def``):
        one sigmoid channel is one foreground class, named by the first word of its description."""
        pred = self.metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
        defs = pred.get("channel_def", {}) or {}
        if int(pred.get("num_channels", 1)) == 1:
            return {(str(defs.get("0", "foreground")).split() or ["foreground"])[0]: 1}
        return {str(v).split()[0]: int(k) for k, v in defs.items() if int(k) > 0}

    # ----------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def segment(self, image: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, dict]:
        """Segment one study into ``out`` (class indices, the study's size and orientation; the format from the
        suffix, see :func:`write_label`). Returns the file and a summary."""
        from medhybrid.inference import _Prepare, segment_files

        net, meta = self.load()
        mask = segment_files(net, _Prepare(meta), [Path(image)])[0]
        path = write_label(mask, image, out)
        counts = {name: int((mask == k).sum()) for name, k in self.labels().items()}
        return path, {"model": str(self.model_path), "shape": [int(s) for s in mask.shape], "pixels": counts,
                      "label_names": self.labels()}

    # ----------------------------------------------------------------------------------------- ranking
    def uncertainty(self, images: Sequence[str | os.PathLike], cfg=None) -> list[float]:
        """:func:`medhybrid.active.mask_disagreement` of each study under the served model."""
        from medhybrid.active import score_files

        net, meta = self.load()
        return score_files(net, meta, images, cfg)

    # ----------------------------------------------------------------------------------------- training
    def history(self) -> list[dict]:
        f = self.workdir / "history.json"
        return json.loads(f.read_text()) if f.is_file() else []

    def train(self, pairs: Sequence[dict], params: TrainParams | dict | None = None) -> dict:
        """Fine-tune the pretrained hybrid checkpoint on ``pairs`` (``{"id", "image", "label"}``: the saved labels)
        with medhybrid's few-shot fine-tuning, validate on the held-out part, publish the weights (atomically) as
        the served model, and return what was done and measured."""
        from medhybrid.config import load_dataset_spec
        from medhybrid.datasets import few_shot_ids
        from medhybrid.evaluate import evaluate
        from medhybrid.finetune import FinetuneConfig, FinetuneSchedule, run_finetuning
        from medhybrid.inference import publish_model
        from medhybrid.pretrain import load_model
        from medhybrid.tracking import MLflowConfig
        from medhybrid.training import TrainConfig

        p = params if isinstance(params, TrainParams) else TrainParams(**(params or {}))
        pairs = list(pairs)
        if not pairs:
            raise ValueError("no saved labels to train on: save at least one label (tag 'final') first")
        if not self.pretrained.is_file():
            raise ConfigError(f"pretrained checkpoint {self.pretrained} not found: training starts from the bundle's "
                              "pretrained hybrid network (models/pretrained.pt, from scripts/build_bundle_weights.sh)")
        meta = load_model(self.pretrained)[1]
        ids = [str(q["id"]) for q in pairs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate study ids in the labelled studies: {sorted({i for i in ids if ids.count(i) > 1})}")
        n_val = int(len(pairs) * p.val_split)
        val = set(few_shot_ids(ids, n_val, p.seed)) if n_val else set()
        folder = self._new_run_folder(len(pairs))
        with open(folder / "datalist.csv", "w") as fh:
            fh.write("id,image,mask,split\n")
            for q in pairs:
                for v in (q["id"], q["image"], q["label"]):
                    if "," in str(v) or "\n" in str(v):
                        raise DataError(v, "a comma or newline in a study id or path cannot go into the training datalist")
                fh.write(f"{q['id']},{Path(q['image']).resolve()},{Path(q['label']).resolve()},{'test' if q['id'] in val else 'pool'}\n")
        classes = int(meta.get("num_classes", 2))
        values = {0: 0, 1: 1, 255: 1} if classes == 2 else {k: k for k in range(classes)}
        spec = load_dataset_spec({"name": "monailabel", "role": "target", "root": str(folder), "datalist": "datalist.csv",
                                  "split": None, "channels": int(meta["image_channels"]), "mask": {"values": values},
                                  "required_splits": ["pool", "test"] if n_val else ["pool"]})
        from medhybrid.check import require_valid

        require_valid(spec)  # every image and label opens, sizes match, mask values known: before any training
        schedule = FinetuneSchedule()
        if p.max_iterations:
            schedule = FinetuneSchedule(min_iterations=p.max_iterations, max_iterations=p.max_iterations,
                                        epochs=min(schedule.epochs, p.max_iterations))
        cfg = FinetuneConfig(
            dataset=spec, init=self.pretrained, method="monailabel", budget=None, seed=p.seed, output_dir=folder / "finetune",
            preprocess=meta["preprocess"], model=meta["model"], schedule=schedule,
            train=TrainConfig(batch_size=p.batch_size, lr=p.lr, warmup_iterations=20, val_max_images=None, grad_clip=1.0,
                              device=pick_device(p.device), check_data=False, progress=False),
            mlflow=MLflowConfig(tracking_uri=f"sqlite:///{self.workdir / 'mlflow.db'}", experiment="medhybrid-label",
                                run_name=folder.name),
            tags={"studies_workdir": str(self.workdir), "labelled": str(len(pairs)), "validation": str(n_val)})
        t0 = time.perf_counter()
        res = run_finetuning(cfg)
        stats: dict = {"run": str(folder), "labelled": len(pairs), "train_images": len(pairs) - n_val, "val_images": n_val,
                       "iterations": schedule.iterations(len(pairs) - n_val), "pretrained": str(self.pretrained),
                       "mlflow_run_id": res.run_id, "train_s": round(time.perf_counter() - t0, 1)}
        if n_val:
            from medhybrid.config import Preprocess

            new = evaluate(load_model(res.checkpoint)[0], spec, cfg.preprocess, "test", out_dir=folder / "validation")
            before_net, before_meta = self.load()  # the model served until now, with its own preprocessing
            before = evaluate(before_net, spec, Preprocess(**before_meta["preprocess"]), "test")
            stats.update(val_dice=new.summary["test_dice"], val_dice_before=before.summary["test_dice"])
            if res.run_id:
                from medhybrid import tracking

                tracking.log_metrics(cfg.mlflow, res.run_id, {"val_dice": stats["val_dice"],
                                                              "val_dice_before": stats["val_dice_before"]}, step=0)
        publish_model(res.checkpoint, self.trained_model)
        stats["model"] = str(self.trained_model)
        write_json(folder / "stats.json", stats, indent=1)
        write_json(self.workdir / "history.json", [*self.history(), {**stats, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}],
                   indent=1)
        log.info("medhybrid label: trained on %d labelled studies (%d held out), published %s", len(pairs), n_val, self.trained_model)
        return stats

    def _new_run_folder(self, n: int) -> Path:
        runs = self.workdir / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(1000):
            folder = runs / (f"train-{stamp}-{n}labels" + ("" if k == 0 else f"-{k}"))
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
        raise RuntimeError(f"cannot create a new run folder in {runs}")
