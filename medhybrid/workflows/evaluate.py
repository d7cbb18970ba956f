"""Evaluation on the target's ``test`` split (or a development set of pool images), at each image's native resolution.

The masks are those of the inference pipeline (:mod:`medhybrid.workflows.inference`: the same preprocessing, the logits mapped
back to the file's pixel grid by MONAI's ``Invertd``, then thresholded) and are compared with the original mask. Dice, IoU and HD95
(``monai.metrics``) are computed per image with ignored pixels excluded; a per-image CSV and overlays
of the best and worst cases are written.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.transforms import Compose

from medhybrid.core.progress import Progress
from medhybrid.data.datasets import load_pairs
from medhybrid.data.io import DataError, data_error
from medhybrid.data.specs import DatasetSpec, Preprocess
from medhybrid.data.transforms import IGNORE_INDEX, LoadImage2Dd, MaskToLabeld, preprocessing
from medhybrid.data.visualize import grid, overlay, save_png
from medhybrid.networks.nets import EDMPrecond, mask_classes
from medhybrid.workflows.inference import inference_postprocessing, inference_preprocessing

log = logging.getLogger("medhybrid")


def predict(net: EDMPrecond, image: torch.Tensor) -> torch.Tensor:
    """Mask logits for preprocessed images (B, C, S, S), at sigma_min."""
    net.eval()
    with torch.no_grad():
        return net.segment(image.to(next(net.parameters()).device).float()).cpu()


def binary_metrics(pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Dice, IoU and HD95 of foreground (all non-background classes) for one image; ``pred``, ``label``
    are (H, W) class maps, label with IGNORE_INDEX excluded. Empty-vs-empty counts as Dice 1."""
    valid = label != IGNORE_INDEX
    p = ((pred > 0) & valid)[None, None].double()
    g = ((label > 0) & valid)[None, None].double()
    # MONAI's metrics; ignore_empty=False scores an empty prediction of an empty mask 1 (Dice, IoU)
    dice = float(compute_dice(p, g, include_background=True, ignore_empty=False).item())
    iou = float(compute_iou(p, g, include_background=True, ignore_empty=False).item())
    if not p.any() or not g.any():
        hd95 = math.nan
    else:
        hd95 = float(compute_hausdorff_distance(p.float(), g.float(), include_background=True, percentile=95).item())
    return {"dice": dice, "iou": iou, "hd95": hd95}


@dataclass
class EvalResult:
    split: str = "test"
    """The name of the evaluated set, the prefix of the :attr:`summary` keys: ``test``, or ``dev`` for a development
    set that is not the test split."""
    rows: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of every pair that could not be read: logged in one line each and left out of the means."""
    csv: Path | None = None
    overlays: list[Path] = field(default_factory=list)

    def mean(self, key: str) -> float:
        vals = [r[key] for r in self.rows if not math.isnan(r[key])]
        return float(np.mean(vals)) if vals else math.nan

    @property
    def summary(self) -> dict[str, float]:
        """Mean Dice, IoU, HD95 and the image count, named after the evaluated set (``test_dice``, ``dev_dice`` ...)."""
        s = self.split
        return {f"{s}_dice": self.mean("dice"), f"{s}_iou": self.mean("iou"), f"{s}_hd95": self.mean("hd95"),
                f"{s}_images": float(len(self.rows))}


def evaluate(net: EDMPrecond, dataset: DatasetSpec, preprocess: Preprocess, split: str = "test",
             out_dir: str | os.PathLike | None = None, batch_size: int = 16, n_overlays: int = 4,
             pairs: list[dict] | None = None, progress: bool = False) -> EvalResult:
    """Evaluate ``net`` on ``split`` of ``dataset`` at native resolution; write ``per_image.csv`` and
    ``best_*.png`` / ``worst_*.png`` overlays under ``out_dir`` when given. With ``pairs`` (a development set drawn
    from the pool), those are evaluated instead and ``split`` names them (``dev``). ``progress``: a bar on a terminal, a
    log line every few images or 30 s otherwise (:class:`~medhybrid.core.progress.Progress`)."""
    pairs = pairs if pairs is not None else load_pairs(dataset, split)
    if not pairs:
        raise ValueError(f"dataset {dataset.name!r} has no {split!r} images to evaluate")
    pre = inference_preprocessing(dataset.channels, preprocess)
    post = inference_postprocessing(pre, net.mask_channels)
    label_of = read_label(dataset)
    result = EvalResult(split)
    keep: list[tuple[float, dict, torch.Tensor, torch.Tensor]] = []
    progress = Progress(len(pairs), "evaluation", enabled=progress)
    for start in range(0, len(pairs), batch_size):
        chunk, items, labels = [], [], []
        for p in pairs[start : start + batch_size]:
            try:
                item = pre({"image": p["image"]})
                lab = torch.as_tensor(label_of({"label": p["label"]})["label"])[0]
            except Exception as e:  # one line naming the file; the other images are still scored
                found = data_error(e)
                reason = f"{found}" if found is not None else f"{p['image']}: cannot be read ({type(e).__name__}: {e})"
                result.failures.append((p["image"], reason))
                log.error("evaluation skipped %s", reason)
                continue
            chunk.append(p)
            items.append(item)
            labels.append(lab)
        if not chunk:
            continue
        logits = predict(net, torch.stack([d["image"] for d in items]))
        for p, d, lg, lab in zip(chunk, items, logits, labels, strict=True):
            pred = post({"pred": MetaTensor(lg), "image": d["image"]})["pred"][0]
            if tuple(lab.shape) != tuple(pred.shape):
                raise DataError(p["label"], f"mask size {tuple(lab.shape)} (HxW) differs from image size "
                                            f"{tuple(pred.shape)} of {p['image']}")
            m_ = binary_metrics(pred, lab)
            row = {"id": p["id"], **m_}
            result.rows.append(row)
            keep.append((m_["dice"], row, d["image"].as_tensor(), mask_classes(lg[None])[0] > 0))
        progress.update(len(pairs[start : start + batch_size]))
    progress.close()
    if result.failures:
        log.error("evaluation: %d of %d image(s) scored, %d could not be read (named above)", len(result.rows), len(pairs),
                  len(result.failures))
    if out_dir is not None:
        _write_csv(result, Path(out_dir))
        result.overlays = _overlays(keep, pairs, dataset, preprocess, Path(out_dir), n_overlays)
    return result


def read_label(dataset: DatasetSpec) -> Compose:
    """``{"label": path}`` -> the mask as a class map (1, H, W) at native resolution, ignored pixels IGNORE_INDEX."""
    m = dataset.mask
    return Compose([LoadImage2Dd("label", label_keys="label"),
                    MaskToLabeld("label", values=m.values, ignore=m.ignore, threshold=m.threshold, ref_key=None)])


def score_masks(masks: dict[str, torch.Tensor], dataset: DatasetSpec, split: str, pairs: list[dict],
                out_dir: str | os.PathLike | None = None) -> EvalResult:
    """Score masks another tool predicted (``masks``: pool or test id -> (H, W) class map at the image's native size)
    against ``pairs``' masks with the metrics :func:`evaluate` uses; ``per_image.csv`` under ``out_dir``. A pair without
    a mask, or with one of another size, raises :class:`~medhybrid.data.io.DataError`."""
    label_of = read_label(dataset)
    result = EvalResult(split)
    for p in pairs:
        if p["id"] not in masks:
            raise DataError(p["image"], "has no predicted mask to score")
        lab = torch.as_tensor(label_of({"label": p["label"]})["label"])[0]
        pred = torch.as_tensor(masks[p["id"]])
        if tuple(lab.shape) != tuple(pred.shape):
            raise DataError(p["label"], f"mask size {tuple(lab.shape)} (HxW) differs from the predicted {tuple(pred.shape)}")
        result.rows.append({"id": p["id"], **binary_metrics(pred, lab)})
    if out_dir is not None:
        _write_csv(result, Path(out_dir))
    return result


def _write_csv(result: EvalResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.csv = out / "per_image.csv"
    with open(result.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "dice", "iou", "hd95"])
        w.writeheader()
        w.writerows(result.rows)


def _overlays(keep, pairs: list[dict], dataset, preprocess, out: Path, n: int) -> list[Path]:
    order = sorted(keep, key=lambda k: k[0])
    by_id = {p["id"]: p for p in pairs}
    t = preprocessing(dataset, preprocess)
    paths = []
    for tag, chosen in (("worst", order[:n]), ("best", order[::-1][:n])):
        tiles = []
        for _, row, x, pm in chosen:
            lab = torch.as_tensor(t(by_id[row["id"]])["label"])[0]
            tiles.append(overlay(x, pm, reference=lab > 0))
        paths.append(save_png(grid([tiles]), out / f"{tag}_{n}.png", upscale=2))
    return paths


__all__ = ["binary_metrics", "EvalResult", "evaluate", "predict", "read_label", "score_masks"]
