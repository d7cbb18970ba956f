"""Evaluation on the target's ``test`` split (or a development set of pool images), at each image's native resolution.

The prediction is made at the model's resolution, mapped back to the original image (padding or
crop undone, logits resized bilinearly) and compared with the original mask. Dice, IoU and HD95
(``monai.metrics``) are computed per image with ignored pixels excluded; a per-image CSV and overlays
of the best and worst cases are written.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

from medhybrid.config import DatasetSpec, Preprocess
from medhybrid.datasets import load_pairs
from medhybrid.networks import EDMPrecond, mask_classes
from medhybrid.transforms import IGNORE_INDEX, aspect_size, native_then_model, preprocessing
from medhybrid.visualize import grid, overlay, save_png


def restore_logits(logits: torch.Tensor, original_hw: tuple[int, int], size: int, aspect: str) -> torch.Tensor:
    """Undo :class:`~medhybrid.transforms.ResizeAspect` on logits (B, K, size, size) -> (B, K, H, W)."""
    h, w = (int(v) for v in original_hw)
    ih, iw = aspect_size((h, w), size, aspect)
    if aspect == "pad":
        top, left = (size - ih) // 2, (size - iw) // 2
        logits = logits[..., top : top + ih, left : left + iw]
    elif aspect == "crop":
        top, left = (ih - size) // 2, (iw - size) // 2
        # the cropped-away border was never seen: extend the logits to the intermediate size by replication
        logits = F.pad(logits, (left, iw - size - left, top, ih - size - top), mode="replicate")
    return F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)


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
             pairs: list[dict] | None = None) -> EvalResult:
    """Evaluate ``net`` on ``split`` of ``dataset`` at native resolution; write ``per_image.csv`` and
    ``best_*.png`` / ``worst_*.png`` overlays under ``out_dir`` when given. With ``pairs`` (a development set drawn
    from the pool), those are evaluated instead and ``split`` names them (``dev``)."""
    pairs = pairs if pairs is not None else load_pairs(dataset, split)
    if not pairs:
        raise ValueError(f"dataset {dataset.name!r} has no {split!r} images to evaluate")
    native, to_model = native_then_model(dataset, preprocess)
    result = EvalResult(split)
    keep: list[tuple[float, dict, torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        decoded = [native({"image": p["image"], "label": p["label"]}) for p in chunk]
        x = torch.stack([torch.as_tensor(to_model({"image": d["image"]})["image"]) for d in decoded])
        logits = predict(net, x)
        for p, d, lg, xm in zip(chunk, decoded, logits, x, strict=True):
            lab = torch.as_tensor(d["label"])[0]
            full = restore_logits(lg[None], tuple(lab.shape), preprocess.resolution, preprocess.aspect)[0]
            pred = mask_classes(full[None])[0]
            m = binary_metrics(pred, lab)
            row = {"id": p["id"], **m}
            result.rows.append(row)
            keep.append((m["dice"], row, xm, mask_classes(lg[None])[0] > 0))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.csv = out / "per_image.csv"
        with open(result.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["id", "dice", "iou", "hd95"])
            w.writeheader()
            w.writerows(result.rows)
        result.overlays = _overlays(keep, pairs, dataset, preprocess, out, n_overlays)
    return result


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
