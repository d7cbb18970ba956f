"""nnU-Net v2 (Isensee et al., Nature Methods 2021) as a few-shot method beside medhybrid's own: the ``nnunet``
ablation method. It runs the real ``nnunetv2`` package on the same labelled subset as every other method:

1. export: the seeded subset's pool pairs as nnU-Net's raw dataset (``imagesTr``/``labelsTr``, ``dataset.json``, PNG
   through nnU-Net's ``NaturalImage2DIO``), and the images to score (the target's test split, or a development set) as
   ``imagesTs``. Images are resized so that their longer side is ``resolution`` pixels, the size every other method's
   network sees (:attr:`NnunetConfig.resolution`), aspect kept; masks go through medhybrid's own mask reading
   (values, ignore label) and are resized nearest;
2. nnU-Net plans and preprocesses the ``2d`` configuration, trains it on all the labelled cases (fold ``all``: with 1
   to 20 labels there is nothing to cross-validate) with ``trainer`` (on a CPU one of nnU-Net's shortened trainers,
   ``nnUNetTrainer_1epoch``: 250 iterations; on a GPU its default 1000 epochs), and predicts ``imagesTs`` with its
   probabilities;
3. the foreground probability is resized (bilinear) to each image's native grid and thresholded at 0.5, then scored by
   medhybrid's evaluator (:func:`medhybrid.workflows.evaluate.score_masks`): the same labels and metrics as every other method.

nnU-Net reads its folders from environment variables when it is imported, so step 2 runs in a child process
(:mod:`medhybrid.experiments.nnunet_child`) with ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``
inside the run folder. The run folder has the lifecycle of every run (:mod:`medhybrid.core.runs`: lock, MLflow child run,
skipped when finished); a run stopped before its end starts nnU-Net again from its export. nnU-Net's final weights
stay in its results folder (``checkpoint_final.pth``); the predictions are made with the network in memory, so no
checkpoint is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from medhybrid.data.datasets import few_shot_pairs, load_pairs
from medhybrid.data.transforms import IGNORE_INDEX, LoadImage2D
from medhybrid.experiments.nnunet_child import DATASET_ID, PREDICTIONS, command
from medhybrid.workflows.evaluate import read_label, score_masks
from medhybrid.workflows.fewshot import FewShotRunConfig, claim_few_shot_run, open_few_shot_run, record_scores

log = logging.getLogger("medhybrid")


class NnunetConfig(FewShotRunConfig):
    """One nnU-Net run on a few-shot subset of a target's pool."""

    resolution: int = Field(64, ge=16, description="the longer side of the exported images, in pixels: the input size "
                            "of the other methods' networks (preprocess.resolution), so every method sees the same pixels")
    trainer: str = Field("nnUNetTrainer_1epoch", description="an nnU-Net trainer class: nnUNetTrainer_1epoch (250 "
                         "iterations) or nnUNetTrainer_5epochs on a CPU, nnUNetTrainer (1000 epochs) on a GPU")
    configuration: str = Field("2d", description="the nnU-Net configuration to train")
    device: str = Field("auto", description="auto, cpu or cuda")
    eval_ids: list[str] | None = Field(None, description="pool ids to predict and score instead of the test split (a "
                                       "development set)")

    runs_subdir: ClassVar[str] = "nnunet"
    what: ClassVar[str] = "nnU-Net"
    product: ClassVar[str] = "eval/per_image.csv"


@dataclass
class NnunetResult:
    folder: Path
    run_id: str | None
    ids: list[str]
    train_s: float


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def nnunet_env(folder: Path, device: str) -> dict[str, str]:
    """The environment of nnU-Net's child process: its three folders inside the run folder; on a CPU no augmentation
    worker processes (one thread per core already trains) and no ``torch.compile``."""
    env = dict(os.environ, nnUNet_raw=str(folder / "nnUNet_raw"), nnUNet_preprocessed=str(folder / "nnUNet_preprocessed"),
               nnUNet_results=str(folder / "nnUNet_results"))
    if device == "cpu":
        env.update(nnUNet_n_proc_DA="0", nnUNet_compile="false", nnUNet_def_n_proc="1")
    return env


# ------------------------------------------------------------------------------------------------ export
def _export_size(shape: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(H, W) with the longer side ``resolution`` and the aspect kept."""
    h, w = shape
    s = resolution / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _image_png(path: str, channels: int, resolution: int, out: Path) -> tuple[int, int]:
    """The image at ``path`` as an 8-bit PNG of export size (RGB or grey); returns its native (H, W)."""
    arr = np.asarray(LoadImage2D(channels=channels)(path))  # (C, H, W), the reader every method uses
    native = arr.shape[-2:]
    lo, hi = float(arr.min()), float(arr.max())
    u8 = np.clip((arr - lo) / (hi - lo + 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(u8[0] if channels == 1 else np.moveaxis(u8, 0, -1))
    h, w = _export_size(native, resolution)
    img.resize((w, h), Image.BILINEAR).save(out)
    return int(native[0]), int(native[1])


def _label_png(path: str, dataset, resolution: int, out: Path) -> None:
    """The mask as nnU-Net labels (0 background, 1.. classes, the ignore label last), resized nearest."""
    lab = read_label(dataset)({"label": path})["label"]
    lab = np.asarray(torch.as_tensor(lab))[0].astype(np.int64)
    n = dataset.mask.num_classes
    lab[lab == IGNORE_INDEX] = n  # nnU-Net's ignore label: the highest one
    h, w = _export_size(lab.shape, resolution)
    Image.fromarray(lab.astype(np.uint8)).resize((w, h), Image.NEAREST).save(out)


def export_raw(cfg: NnunetConfig, pairs: list[dict], score: list[dict]) -> Path:
    """nnU-Net's raw dataset of the labelled ``pairs`` (``imagesTr``/``labelsTr``) and the images to ``score``
    (``imagesTs``); returns its folder. ``native.json`` keeps each scored image's native size."""
    root = cfg.folder / "nnUNet_raw" / f"Dataset{DATASET_ID:03d}_{cfg.dataset.name.replace('-', '_')}"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    c = cfg.dataset.channels
    for p in pairs:
        _image_png(p["image"], c, cfg.resolution, root / "imagesTr" / f"{p['id']}_0000.png")
        _label_png(p["label"], cfg.dataset, cfg.resolution, root / "labelsTr" / f"{p['id']}.png")
    native = {p["id"]: _image_png(p["image"], c, cfg.resolution, root / "imagesTs" / f"{p['id']}_0000.png") for p in score}
    labels = {"background": 0, **{f"class{i}": i for i in range(1, cfg.dataset.mask.num_classes)}}
    if cfg.dataset.mask.ignore:
        labels["ignore"] = cfg.dataset.mask.num_classes
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"} if c == 3 else {"0": "grey"}, "labels": labels,
        "numTraining": len(pairs), "file_ending": ".png", "overwrite_image_reader_writer": "NaturalImage2DIO"}, indent=1))
    (root / "native.json").write_text(json.dumps(native))
    return root


# ------------------------------------------------------------------------------------------------ nnU-Net's results
def native_masks(folder: Path, raw: Path) -> dict[str, torch.Tensor]:
    """Per scored image: nnU-Net's foreground probability resized (bilinear) to the image's native grid, thresholded at
    0.5 (binary), or its class probabilities resized and arg-maxed; (H, W) class maps."""
    native = json.loads((raw / "native.json").read_text())
    out = {}
    for case, (h, w) in native.items():
        prob = torch.as_tensor(np.load(folder / PREDICTIONS / f"{case}.npz")["probabilities"]).float()  # (C, 1, h, w)
        prob = torch.nn.functional.interpolate(prob[:, 0][None], size=(h, w), mode="bilinear", align_corners=False)[0]
        out[case] = (prob[1] >= 0.5).long() if prob.shape[0] == 2 else prob.argmax(0)
    return out


def run_nnunet(cfg: NnunetConfig) -> NnunetResult:
    """Train nnU-Net on the subset, predict the images to score (the test split, or the pool's ``eval_ids``) and score them
    (:func:`medhybrid.workflows.fewshot.record_scores`: ``state.json`` and the MLflow run); a finished run is found again."""
    pairs = few_shot_pairs(cfg.dataset, cfg.budget, cfg.seed, ids=cfg.ids)  # pool only; never a test pair
    ids = [p["id"] for p in pairs]
    if cfg.eval_ids is None:
        score, split = load_pairs(cfg.dataset, "test"), "test"
    else:
        wanted = set(cfg.eval_ids)
        score, split = [p for p in load_pairs(cfg.dataset, "pool") if p["id"] in wanted], "dev"
        if wanted & set(ids):
            raise ValueError(f"{cfg.folder}: development images {sorted(wanted & set(ids))} are also labelled")
    with claim_few_shot_run(cfg) as run:
        if run.finished:
            return NnunetResult(cfg.folder, run.state.get("mlflow_run_id"), run.state.get("ids", []), 0.0)
        run_id = open_few_shot_run(cfg, run, ids)
        t0 = time.perf_counter()
        raw = export_raw(cfg, pairs, score)
        device = _device(cfg.device)
        log.info("nnU-Net (%s, %s): %d labelled images, %d to predict, %s", cfg.trainer, cfg.configuration, len(pairs),
                 len(score), device)
        child = subprocess.run([sys.executable, "-m", "medhybrid.experiments.nnunet_child",
                                *command(cfg.folder, device, cfg.seed, cfg.configuration, cfg.trainer)],
                               env=nnunet_env(cfg.folder, device), capture_output=True, text=True)
        (cfg.folder / "nnunet.log").write_text(child.stdout + child.stderr)
        if child.returncode:
            last = [x for x in (child.stderr or child.stdout).strip().splitlines() if x.strip()][-1:] or ["(no output)"]
            raise RuntimeError(f"nnU-Net failed in {cfg.folder} (see {cfg.folder / 'nnunet.log'}): {last[0]}")
        train_s = time.perf_counter() - t0
        ev = score_masks(native_masks(cfg.folder, raw), cfg.dataset, split, score, cfg.folder / "eval")
        record_scores(cfg.mlflow, cfg.folder, run_id, ev)
        run.finish([cfg.folder / "config.yaml", cfg.folder / "subset.json", cfg.folder / "nnunet.log"], ids=ids,
                   train_s=train_s)
        return NnunetResult(cfg.folder, run_id, ids, train_s)


__all__ = ["DATASET_ID", "export_raw", "native_masks", "nnunet_env", "NnunetConfig", "NnunetResult", "PREDICTIONS",
           "run_nnunet"]
