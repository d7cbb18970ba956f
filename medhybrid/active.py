"""Which image to label next: uncertainty from mask disagreement across noise levels, and the experiment
that measures whether labelling in that order beats random order.

The hybrid network is conditioned on a noise level and was trained to predict masks from noised images.
Its uncertainty about an image is read from how much its mask changes when the image is noised:

    u(x) = 1 - mean_{sigma, r} Dice( m(x + sigma * eps_r; sigma), m(x; sigma_min) )

with ``m`` the hard mask, ``eps_r`` fixed seeded Gaussian noise and ``sigma`` a few small noise levels
(images live in [-1, 1]). ``u`` is 0 when the mask does not move and near 1 when it falls apart; it is
normalised by object size, unlike a pixel-entropy sum, so a large lesion is not "uncertain" for its
long boundary alone. Only images (never labels) are read, so any unlabelled image can be scored.

:func:`run_active_learning` simulates a clinician on a target domain's pool: the ``uncertainty``
strategy labels the most uncertain pool images under the current model, fine-tunes (from the pretrained
checkpoint, medhybrid's few-shot fine-tuning), rescores the rest and labels more, up to each budget;
``random`` labels the ablation's seeded subsets. Both are scored on the target's test split, which is
never used to choose anything.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from medhybrid.config import NoiseLevels, Preprocess, StrictModel
from medhybrid.networks import HybridUNet

log = logging.getLogger("medhybrid")


class UncertaintyConfig(StrictModel):
    """Noise levels and draws of :func:`mask_disagreement`."""

    sigmas: NoiseLevels = Field((0.05, 0.1, 0.2), description="noise levels the mask is re-predicted at")
    repeats: int = Field(2, ge=1, description="noise draws per level")
    seed: int = 0
    batch_size: int = Field(16, ge=1)


# --------------------------------------------------------------------------------------------- the score
def hard_mask(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) mask logits -> (B, H, W) class indices (``logit > 0`` for one sigmoid channel)."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def mask_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image Dice between (B, H, W) class maps, averaged over foreground classes present in either;
    1 where neither has any foreground (two empty masks agree)."""
    out = torch.ones(a.shape[0], dtype=torch.float64)
    per, seen = torch.zeros_like(out), torch.zeros_like(out)
    for c in range(1, max(2, num_classes)):
        pa, pb = (a == c).flatten(1), (b == c).flatten(1)
        total = (pa.sum(1) + pb.sum(1)).double()
        present = total > 0
        inter = (pa & pb).sum(1).double()
        per += torch.where(present, 2 * inter / total.clamp(min=1), torch.zeros_like(total))
        seen += present.double()
    return torch.where(seen > 0, per / seen.clamp(min=1), out)


def _mask_logits(net: HybridUNet, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mask logits of ``x`` fed at noise level ``sigma`` (a served :class:`medhybrid.inference.Segmenter`'s own forward
    takes no sigma: the HybridUNet forward it inherits does)."""
    from medhybrid.inference import Segmenter

    out = HybridUNet.forward(net, x, sigma) if isinstance(net, Segmenter) else net(x, sigma)
    return out[:, net.image_channels :]


@torch.no_grad()
def mask_disagreement(net: HybridUNet, x: torch.Tensor, sigmas: Sequence[float] = (0.05, 0.1, 0.2), repeats: int = 2,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """u(x) for a batch of clean images ``x`` (B, C_img, H, W) in [-1, 1]: 1 - mean Dice between the mask of
    ``x`` at sigma_min and the masks of ``x + sigma * eps`` at ``sigma``. Returns (B,) float64 on the CPU."""
    dev = next(net.parameters()).device
    x = x.to(dev).float()
    k = net.mask_channels if net.mask_channels > 1 else 2
    clean = hard_mask(net.segment(x)).cpu()
    dice = torch.zeros(x.shape[0], dtype=torch.float64)
    for sigma in sigmas:
        for _ in range(repeats):
            eps = torch.randn(x.shape, generator=generator).to(dev)
            noisy = _mask_logits(net, x + sigma * eps, sigma)
            dice += mask_dice(hard_mask(noisy).cpu(), clean, k)
    return 1.0 - dice / (len(sigmas) * repeats)


def score_images(net: HybridUNet, images: Sequence[torch.Tensor], cfg: UncertaintyConfig | None = None) -> list[float]:
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


def score_pairs(net: HybridUNet, pairs: Sequence[dict], channels: int, preprocess: Preprocess,
                cfg: UncertaintyConfig | None = None) -> dict[str, float]:
    """``{id: u}`` for dataset pairs (only their images are read)."""
    from types import SimpleNamespace

    from medhybrid.transforms import preprocessing

    t = preprocessing(SimpleNamespace(channels=channels), preprocess, with_label=False)
    images = [t({"image": p["image"]})["image"] for p in pairs]
    return dict(zip([p["id"] for p in pairs], score_images(net, images, cfg), strict=True))


def score_files(net: HybridUNet, meta: dict, files: Sequence[str | os.PathLike], cfg: UncertaintyConfig | None = None) -> list[float]:
    """u for image files (PNG, JPEG, DICOM, NIfTI ...) under the model's own preprocessing (``meta`` of its
    model.pt); raises :class:`medhybrid.io.DataError` naming a file that cannot be read."""
    from medhybrid.inference import _Prepare

    prepare = _Prepare(meta)
    return score_images(net, [prepare(Path(f))[0] for f in files], cfg)


def most_uncertain(scores: dict[str, float], n: int, exclude: Sequence[str] = ()) -> list[str]:
    """The ``n`` ids of highest score outside ``exclude``; ties broken by id, so the order is deterministic."""
    skip = set(exclude)
    ranked = sorted((i for i in scores if i not in skip), key=lambda i: (-scores[i], i))
    return ranked[:n]


# --------------------------------------------------------------------------------------------- the experiment
class ActiveLearningConfig(StrictModel):
    """Uncertainty order vs random order at the same label budgets, on an ablation's target domain."""

    method: str = Field("hybrid", description="the ablation method whose pretrained checkpoint is fine-tuned")
    strategies: list[Literal["random", "uncertainty"]] = Field(default_factory=lambda: ["random", "uncertainty"])
    budgets: list[int] = Field(default_factory=lambda: [2, 5, 10, 20], description="increasing label budgets (labelling rounds)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    uncertainty: UncertaintyConfig = Field(default_factory=UncertaintyConfig)

    @field_validator("budgets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or v[0] < 1 or any(b >= c for b, c in zip(v, v[1:], strict=False)):
            raise ValueError(f"budgets must be increasing positive label counts, got {v}")
        return v


def run_active_learning(abl, cfg: ActiveLearningConfig) -> dict:
    """Run (or resume) the experiment on ``abl``'s (:class:`medhybrid.ablation.AblationConfig`) target domain
    with its fine-tuning settings; write ``results.csv``, ``report.md`` and ``plot.png`` under
    ``<ablation folder>/active-learning/<method>``. Returns their paths and the result rows."""
    from medhybrid import tracking
    from medhybrid.ablation import pretrain_config
    from medhybrid.datasets import few_shot_ids, load_pairs
    from medhybrid.pretrain import load_model, run_pretraining

    if cfg.method not in abl.methods or abl.methods[cfg.method].pretrain == "none":
        raise ValueError(f"method {cfg.method!r} must be a pretrained method of ablation {abl.name!r} ({sorted(abl.methods)})")
    folder = abl.folder / "active-learning" / cfg.method
    folder.mkdir(parents=True, exist_ok=True)
    from medhybrid.config import save_config

    save_config(cfg, folder / "config.yaml")
    pre = run_pretraining(pretrain_config(abl, cfg.method))
    init_net, meta = load_model(pre.checkpoint)
    preprocess = Preprocess(**meta["preprocess"])
    pool = load_pairs(abl.target, "pool")
    if cfg.budgets[-1] > len(pool):
        raise ValueError(f"budget {cfg.budgets[-1]} is larger than the pool of {abl.target.name!r} ({len(pool)} images)")
    parent = None
    if abl.mlflow.enabled:
        parent = tracking.open_run(abl.mlflow, folder, f"active-learning-{abl.name}-{cfg.method}",
                                   params={"budgets": str(cfg.budgets), "seeds": str(cfg.seeds), "strategies": ",".join(cfg.strategies),
                                           "sigmas": str(cfg.uncertainty.sigmas), "repeats": cfg.uncertainty.repeats},
                                   tags={"medhybrid.stage": "active-learning", "domain": abl.target.name, "ablation": abl.name})
    rows: list[dict] = []
    for seed in cfg.seeds:
        for strategy in cfg.strategies:
            selected: list[str] = []
            net = init_net
            for budget in cfg.budgets:
                if strategy == "random":
                    selected = few_shot_ids([p["id"] for p in pool], budget, seed)
                else:
                    scores = score_pairs(net, pool, abl.target.channels, preprocess, cfg.uncertainty)
                    selected = selected + most_uncertain(scores, budget - len(selected), exclude=selected)
                    (folder / strategy / f"b{budget}-s{seed}").mkdir(parents=True, exist_ok=True)
                    _write_json(folder / strategy / f"b{budget}-s{seed}" / "scores.json", scores)
                net, dice = _finetune_and_test(abl, cfg, pre, folder, strategy, budget, seed, selected, parent)
                rows.append({"strategy": strategy, "budget": budget, "seed": seed, "test_dice": dice, "ids": " ".join(selected)})
                log.info("active learning %s: %s b%d s%d test dice %.4f", abl.name, strategy, budget, seed, dice)
    paths = write_active_report(rows, folder, abl.target.name, cfg)
    if parent:
        for p in paths.values():
            tracking.log_artifact(abl.mlflow, parent, p, "report")
        tracking.finish_run(abl.mlflow, parent)
    return {**paths, "rows": rows, "parent_run_id": parent}


def _finetune_and_test(abl, cfg: ActiveLearningConfig, pre, folder: Path, strategy: str, budget: int, seed: int,
                       ids: list[str], parent: str | None) -> tuple[HybridUNet, float]:
    from medhybrid import tracking
    from medhybrid.config import deep_merge, dump_config, validate
    from medhybrid.evaluate import evaluate
    from medhybrid.finetune import FinetuneConfig, run_finetuning
    from medhybrid.pretrain import load_model

    meta = load_model(pre.checkpoint)[1]
    out = folder / strategy / f"b{budget}-s{seed}"
    data = deep_merge(abl.finetune, dict(
        dataset=abl.target.model_dump(), method=f"{cfg.method}-{strategy}", budget=budget, seed=seed, ids=ids,
        init=str(pre.checkpoint), preprocess=meta["preprocess"], model=meta["model"], output_dir=str(out), parent_run_id=parent,
        tags={"strategy": strategy, "active_learning": abl.name, "pretrain_run_id": pre.run_id or ""},
        mlflow=deep_merge(dump_config(abl.mlflow), {"run_name": f"{abl.name}-al-{strategy}-b{budget}-s{seed}"})))
    fcfg = validate(FinetuneConfig, data, source=f"active learning {abl.name} {strategy} b{budget} s{seed}")
    res = run_finetuning(fcfg)
    net, _ = load_model(res.checkpoint)
    st = tracking.read_state(fcfg.folder)
    if st.get("evaluated"):
        return net, float(st["test"]["test_dice"])
    ev = evaluate(net, fcfg.dataset, fcfg.preprocess, "test", out_dir=fcfg.folder / "eval")
    if res.run_id:
        tracking.log_metrics(abl.mlflow, res.run_id, ev.summary, step=0)
        tracking.log_artifact(abl.mlflow, res.run_id, ev.csv, "eval")
    tracking.write_state(fcfg.folder, evaluated=True, test=ev.summary)
    return net, float(ev.summary["test_dice"])


def _write_json(path: Path, data) -> None:
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_active_report(rows: list[dict], folder: Path, domain: str, cfg: ActiveLearningConfig) -> dict[str, Path]:
    """``results.csv`` (one row per run), ``report.md`` (mean and sd per strategy and budget, the paired difference
    uncertainty - random per seed) and ``plot.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = folder / "results.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["strategy", "budget", "seed", "test_dice", "ids"])
        w.writeheader()
        w.writerows(rows)
    dice = {(r["strategy"], r["budget"], r["seed"]): r["test_dice"] for r in rows}
    strategies = [s for s in cfg.strategies if any(r["strategy"] == s for r in rows)]
    lines = [f"# Next-sample strategy on {domain}: uncertainty order vs random order", "",
             f"Method `{cfg.method}` (its pretrained checkpoint, fine-tuned on the labelled images with medhybrid's few-shot "
             f"fine-tuning), seeds {cfg.seeds}. Test Dice on the {domain} test split (never used to choose images). "
             f"Uncertainty: 1 - mean Dice of the mask under noise sigma in {list(cfg.uncertainty.sigmas)} "
             f"({cfg.uncertainty.repeats} draws each) against the clean mask; the most uncertain pool images are labelled "
             "first, rescored after each round's fine-tuning.", "",
             "| labels | " + " | ".join(strategies) + (" | uncertainty - random (per seed) |" if len(strategies) == 2 else " |"),
             "|---|" + "---|" * len(strategies) + ("---|" if len(strategies) == 2 else "")]
    for b in cfg.budgets:
        cells = []
        for s in strategies:
            v = [dice[(s, b, sd)] for sd in cfg.seeds if (s, b, sd) in dice]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–")
        if len(strategies) == 2:
            d = [dice[("uncertainty", b, sd)] - dice[("random", b, sd)] for sd in cfg.seeds
                 if ("uncertainty", b, sd) in dice and ("random", b, sd) in dice]
            cells.append(f"{np.mean(d):+.3f} ({', '.join(f'{x:+.3f}' for x in d)})" if d else "–")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    if len(strategies) == 2:
        d = [dice[("uncertainty", b, sd)] - dice[("random", b, sd)] for b in cfg.budgets for sd in cfg.seeds
             if ("uncertainty", b, sd) in dice and ("random", b, sd) in dice]
        if d:
            wins = sum(x > 0 for x in d)
            lines += ["", f"Pooled over budgets and seeds: mean difference {np.mean(d):+.4f}, uncertainty ahead in {wins} of "
                      f"{len(d)} pairs (sign test p = {_sign_test(d):.3f})."]
    md = folder / "report.md"
    md.write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for s in strategies:
        m = [np.mean([dice[(s, b, sd)] for sd in cfg.seeds if (s, b, sd) in dice] or [math.nan]) for b in cfg.budgets]
        ax.plot(cfg.budgets, m, marker="o", label=s)
    ax.set_xscale("log")
    ax.set_xticks(cfg.budgets, [str(b) for b in cfg.budgets])
    ax.set_xlabel("labelled images")
    ax.set_ylabel(f"test Dice ({domain})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = folder / "plot.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return {"csv": csv_path, "markdown": md, "plot": png}


def _sign_test(diffs: Sequence[float]) -> float:
    """Two-sided sign test of ``diffs`` against 0 (ties dropped)."""
    from scipy.stats import binomtest

    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return float(binomtest(pos, pos + neg).pvalue) if pos + neg else 1.0
