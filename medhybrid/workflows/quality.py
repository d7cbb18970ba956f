"""How sure the network is of a mask, from the images alone: the score that orders images for review (the quality
CSV of every inference run, :class:`QualityReport`) and for labelling (:mod:`medhybrid.experiments.active`, MONAI Label's
next-sample strategy).

The network is conditioned on a noise level and learnt to predict masks from noised images. Its uncertainty about an
image is how much the mask moves when the image is noised::

    u(x) = 1 - mean_{sigma, r} Dice( m(x + sigma * eps_r; sigma), m(x; sigma_min) )

with ``m`` the hard mask, ``eps_r`` seeded Gaussian noise and ``sigma`` a few small noise levels (images live in
[-1, 1]). ``u`` is 0 when the mask does not move and near 1 when it falls apart; normalised by object size, so a
large lesion is not "uncertain" for its long boundary alone.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.inferers import SimpleInferer
from monai.metrics import compute_dice
from pydantic import Field
from scipy.stats import spearmanr

from medhybrid.core.config import NoiseLevels, StrictModel
from medhybrid.core.files import atomic_write
from medhybrid.networks.nets import EDMPrecond, mask_classes

__all__ = ["UncertaintyConfig", "mask_dice", "mask_disagreement", "score_images", "image_scores", "QualityInferer",
           "QualityReport", "QUALITY_CSV", "QUALITY_SCORE"]

QUALITY_CSV = "quality.csv"


class UncertaintyConfig(StrictModel):
    """Noise levels and draws of :func:`mask_disagreement`."""

    sigmas: NoiseLevels = Field((0.05, 0.1, 0.2), description="noise levels the mask is re-predicted at")
    repeats: int = Field(2, ge=1, description="noise draws per level")
    seed: int = 0
    batch_size: int = Field(16, ge=1)


# --------------------------------------------------------------------------------------------- the score
def mask_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image Dice between (B, H, W) class maps (MONAI's ``compute_dice`` per foreground class, in float64), averaged
    over the foreground classes present in either; 1 where neither has any foreground (two empty masks agree)."""
    k = max(2, num_classes)
    onehot = [torch.stack([(m == c) for c in range(k)], dim=1).double() for m in (a, b)]
    per = compute_dice(onehot[0], onehot[1], include_background=False, ignore_empty=False)  # (B, k - 1)
    present = torch.stack([((a == c) | (b == c)).flatten(1).any(1) for c in range(1, k)], dim=1)
    seen = present.sum(1)
    mean = torch.where(present, per, torch.zeros_like(per)).sum(1) / seen.clamp(min=1)
    return torch.where(seen > 0, mean, torch.ones_like(mean))


def _mask_logits(net: EDMPrecond, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mask logits of ``x`` fed at noise level ``sigma`` (``denoise``: the whole output of an EDMPrecond or a served
    :class:`medhybrid.workflows.inference.Segmenter`)."""
    return net.denoise(x, sigma)[:, net.image_channels :]


@torch.no_grad()
def mask_disagreement(net: EDMPrecond, x: torch.Tensor, sigmas: Sequence[float] = (0.05, 0.1, 0.2), repeats: int = 2,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """u(x) for a batch of clean images ``x`` (B, C_img, H, W) in [-1, 1]: 1 - mean Dice between the mask of
    ``x`` at sigma_min and the masks of ``x + sigma * eps`` at ``sigma``. Returns (B,) float64 on the CPU."""
    dev = next(net.parameters()).device
    x = x.to(dev).float()
    k = net.mask_channels if net.mask_channels > 1 else 2
    clean = mask_classes(net.segment(x)).cpu()
    dice = torch.zeros(x.shape[0], dtype=torch.float64)
    for sigma in sigmas:
        for _ in range(repeats):
            eps = torch.randn(x.shape, generator=generator).to(dev)
            noisy = _mask_logits(net, x + sigma * eps, sigma)
            dice += mask_dice(mask_classes(noisy).cpu(), clean, k)
    return 1.0 - dice / (len(sigmas) * repeats)


def score_images(net: EDMPrecond, images: Sequence[torch.Tensor], cfg: UncertaintyConfig | None = None) -> list[float]:
    """u(x) for model-ready images (C, H, W), in order. The noise is drawn from one generator seeded with
    ``cfg.seed``, so the same images in the same order get the same scores."""
    cfg = cfg or UncertaintyConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    was_training = net.training
    net.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(images), cfg.batch_size):
            x = torch.stack([torch.as_tensor(t).float() for t in images[start : start + cfg.batch_size]])
            scores += mask_disagreement(net, x, cfg.sigmas, cfg.repeats, g).tolist()
    finally:
        net.train(was_training)
    return scores



@torch.no_grad()
def image_scores(net: EDMPrecond, x: torch.Tensor, cfg: UncertaintyConfig | None = None,
                 clean: torch.Tensor | None = None) -> list[float]:
    """u for each image of a batch (B, C, H, W), the same u as :func:`mask_disagreement` on that image alone with a
    generator seeded by ``cfg.seed``: an image gets the same score whatever batch, order or folder it comes in (what
    a per-run CSV needs). Every noised copy of every image goes through the network in one batch; ``clean``, the
    mask logits of ``x`` at sigma_min when the caller has them already (:class:`QualityInferer`), spares the clean
    pass."""
    cfg = cfg or UncertaintyConfig()
    was_training = net.training
    net.eval()
    try:
        dev = next(net.parameters()).device
        x = x.to(dev).float()
        levels = [s for s in cfg.sigmas for _ in range(cfg.repeats)]
        eps = []
        for i in range(x.shape[0]):  # per image, drawn in mask_disagreement's order
            g = torch.Generator().manual_seed(cfg.seed)
            eps += [torch.randn(x[i : i + 1].shape, generator=g) for _ in levels]
        noisy = x.repeat_interleave(len(levels), 0) + torch.cat(eps).to(dev) * torch.tensor(levels, device=dev).repeat(
            x.shape[0]).view(-1, 1, 1, 1)
        sig = torch.tensor(levels, device=dev).repeat(x.shape[0])
        if clean is None:
            clean = _mask_logits(net, x, net.sigma_min)
        clean = mask_classes(_plain(clean)).cpu()
        moved = mask_classes(_mask_logits(net, noisy, sig)).cpu()
        k = net.mask_channels if net.mask_channels > 1 else 2
        dice = mask_dice(moved, clean.repeat_interleave(len(levels), 0), k).view(x.shape[0], len(levels))
        return (1.0 - dice.mean(1)).tolist()
    finally:
        net.train(was_training)


QUALITY_SCORE = UncertaintyConfig(repeats=1)
"""The score of the quality CSV: one draw per noise level (the network runs 3 times per image beside the mask's pass,
not 6: inference's cost is the network's, and the ranking holds; see the model cards)."""


class QualityInferer(SimpleInferer):
    """The inferer of an inference run that scores as it segments: it returns the mask logits of the batch (the
    served network's output at sigma_min, as ``SimpleInferer`` does) and keeps each image's u (:func:`image_scores`,
    with ``cfg``) in :attr:`scores`, computed from that same clean pass, for :class:`QualityReport`. The network
    runs 1 + len(sigmas) x repeats times per image, not one time more. The logits keep the batch's MONAI metadata
    (as ``SimpleInferer``'s do), which ``Invertd`` needs to map them back to each file's grid."""

    def __init__(self, cfg: UncertaintyConfig | None = None):
        super().__init__()
        self.cfg = cfg or QUALITY_SCORE
        self.scores: list[float] = []

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        logits = network(inputs, *args, **kwargs)
        self.scores = image_scores(network, _plain(inputs), self.cfg, clean=logits)
        return logits


class QualityReport:
    """Ignite handler of an inference run: for every image, the mask's area fraction and the uncertainty ``u`` of the
    network on it (:func:`image_scores` on the batch the network saw; taken from the engine's :class:`QualityInferer`
    when it runs one with the same settings, so the clean pass is not repeated), written at the end as ``quality.csv`` in
    ``output_dir``, the least certain first, after the files that could not be read (``unreadable``, from a
    :class:`medhybrid.workflows.inference.ImageStream` given as ``stream``).

    Columns: ``image`` (the input file), ``mask`` (the mask written), ``area_fraction`` (foreground pixels / all
    pixels), ``uncertainty`` (u in [0, 1]), ``status`` (``ok``, or ``unreadable: <reason>``)."""

    def __init__(self, output_dir: str | Path, cfg: UncertaintyConfig | None = None, stream=None,
                 image_key: str = "image", pred_key: str = "pred"):
        self.output_dir, self.cfg, self.stream = Path(output_dir), cfg or QUALITY_SCORE, stream
        self.image_key, self.pred_key = image_key, pred_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.write())

    def iteration_completed(self, engine: Engine) -> None:
        # MONAI's engines hand the batch and the output to handlers decollated: one dict per image
        items = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        inferer = getattr(engine, "inferer", None)
        if isinstance(inferer, QualityInferer) and inferer.cfg == self.cfg and len(inferer.scores) == len(items):
            scores = inferer.scores  # scored on the pass that made the masks
        else:
            net = engine.network
            x = torch.stack([_plain(d[self.image_key]) for d in items]).to(next(net.parameters()).device).float()
            scores = image_scores(net, x, self.cfg)
        names = [getattr(d[self.image_key], "meta", {}).get("filename_or_obj", "") for d in items]
        for name, u, out in zip(names, scores, outputs, strict=True):
            pred = out[self.pred_key]
            saved = getattr(pred, "meta", {}).get("saved_to") or [""]
            self.rows.append({"image": str(name), "mask": str(saved[0]), "area_fraction": _area_fraction(pred),
                              "uncertainty": u, "status": "ok"})

    def write(self) -> Path:
        """``quality.csv``: unreadable files first, then the least certain image first (ties by name)."""
        bad = [{"image": p, "mask": "", "area_fraction": math.nan, "uncertainty": math.nan, "status": f"unreadable: {why}"}
               for p, why in (getattr(self.stream, "failures", None) or [])]
        rows = bad + sorted(self.rows, key=lambda r: (-r["uncertainty"], r["image"]))
        path = self.output_dir / QUALITY_CSV
        with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["image", "mask", "area_fraction", "uncertainty", "status"])
            w.writeheader()
            for r in rows:
                w.writerow({**r, "area_fraction": _fmt(r["area_fraction"]), "uncertainty": _fmt(r["uncertainty"])})
        return path


def _plain(t) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor: the network runs without MONAI's per-operation metadata tracking."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def _area_fraction(pred) -> float:
    """Foreground pixels / all pixels of a class map (counted, not averaged as float: a camera-size mask has 12 M)."""
    t = _plain(pred)
    return float(torch.count_nonzero(t)) / max(1, t.numel())


def _fmt(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.4f}"


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (NaN pairs dropped; NaN below 3 pairs)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return math.nan
    return float(spearmanr(np.array(pairs)[:, 0], np.array(pairs)[:, 1]).statistic)
