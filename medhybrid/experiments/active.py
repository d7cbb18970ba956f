"""Which image to label next: uncertainty from mask disagreement across noise levels, and the experiment
that measures whether labelling in that order beats random order.

The hybrid network is conditioned on a noise level and was trained to predict masks from noised images.
Its uncertainty about an image is read from how much its mask changes when the image is noised::

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
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import Field, field_validator
from scipy.stats import binomtest, spearmanr

from medhybrid.core import runs, tracking
from medhybrid.core.config import StrictModel, deep_merge, dump_config, save_config, validate
from medhybrid.core.files import write_json
from medhybrid.data.datasets import few_shot_ids, load_pairs
from medhybrid.data.specs import Preprocess
from medhybrid.data.transforms import preprocessing
from medhybrid.experiments.ablation import pretrain_config
from medhybrid.networks.checkpoints import load_model
from medhybrid.networks.nets import EDMPrecond
from medhybrid.workflows.evaluate import evaluate
from medhybrid.workflows.fewshot import evaluate_few_shot_run
from medhybrid.workflows.finetune import FinetuneConfig, run_finetuning
from medhybrid.workflows.pretrain import run_pretraining
from medhybrid.workflows.quality import UncertaintyConfig, mask_dice, mask_disagreement, score_images  # noqa: F401 (re-exported)

log = logging.getLogger("medhybrid")


@torch.no_grad()
def embed_images(net: EDMPrecond, images: Sequence[torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """(N, C) unit-norm embeddings of model-ready images: the U-Net's bottleneck (``backbone.middle_block``)
    activations of the clean image, averaged over space."""
    feats: list[torch.Tensor] = []
    hook = net.backbone.middle_block.register_forward_hook(lambda m, i, o: feats.append(o.float().mean((2, 3)).cpu()))
    was_training = net.training
    net.eval()
    dev = next(net.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            net.segment(torch.stack([torch.as_tensor(t).float() for t in images[start : start + batch_size]]).to(dev))
    finally:
        hook.remove()
        net.train(was_training)
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def information_density(emb: torch.Tensor) -> torch.Tensor:
    """Mean similarity of each image to the others, in [0, 1] ((1 + cosine) / 2; Settles & Craven 2008): low for an
    outlier, high for an image like many others."""
    n = emb.shape[0]
    if n < 2:
        return torch.ones(n)
    sim = (1 + emb @ emb.T) / 2
    return ((sim.sum(1) - sim.diagonal()) / (n - 1)).clamp(0, 1)


def density_weighted(scores: dict[str, float], density: dict[str, float], beta: float = 1.0) -> dict[str, float]:
    """u(x) * density(x)^beta: uncertain images that are also typical of the pool come first."""
    return {i: scores[i] * density[i] ** beta for i in scores}


def _pair_images(pairs: Sequence[dict], channels: int, preprocess: Preprocess) -> dict[str, torch.Tensor]:
    """``{id: model-ready image}`` of dataset pairs (only their images are read)."""
    t = preprocessing(SimpleNamespace(channels=channels), preprocess, with_label=False)
    return {p["id"]: torch.as_tensor(t({"image": p["image"]})["image"]) for p in pairs}


def most_uncertain(scores: dict[str, float], n: int, exclude: Sequence[str] = ()) -> list[str]:
    """The ``n`` ids of highest score outside ``exclude``; ties broken by id, so the order is deterministic."""
    skip = set(exclude)
    ranked = sorted((i for i in scores if i not in skip), key=lambda i: (-scores[i], i))
    return ranked[:n]


# --------------------------------------------------------------------------------------------- the experiment
class ActiveLearningConfig(StrictModel):
    """Uncertainty order vs random order at the same label budgets, on an ablation's target domain."""

    method: str = Field("hybrid", description="the ablation method whose pretrained checkpoint is fine-tuned")
    strategies: list[Literal["random", "uncertainty", "density"]] = Field(
        default_factory=lambda: ["random", "uncertainty"],
        description="random: the ablation's seeded subsets; uncertainty: highest u first; density: highest u * density^beta")
    density_beta: float = Field(1.0, ge=0, description="weight of information density in the density strategy")
    evaluate_on: Literal["test", "pool-holdout"] = Field(
        "test", description="test: the target's test split (the reported result). pool-holdout: a fixed set of `holdout` pool "
        "images, never selectable, scores every run: a development set for choosing a strategy without touching test")
    holdout: int = Field(30, ge=1, description="pool images held out as the development set (pool-holdout)")
    budgets: list[int] = Field(default_factory=lambda: [2, 5, 10, 20], description="increasing label budgets (labelling rounds)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    uncertainty: UncertaintyConfig = Field(default_factory=UncertaintyConfig)

    @field_validator("budgets")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or v[0] < 1 or any(b >= c for b, c in zip(v, v[1:], strict=False)):
            raise ValueError(f"budgets must be increasing positive label counts, got {v}")
        return v

    @property
    def scored_on(self) -> str:
        """The name of the set the fine-tunes are scored on, the prefix of their metrics: ``test`` or ``dev``."""
        return "test" if self.evaluate_on == "test" else "dev"


def run_active_learning(abl, cfg: ActiveLearningConfig) -> dict:
    """Run (or resume) the experiment on ``abl``'s (:class:`medhybrid.experiments.ablation.AblationConfig`) target domain
    with its fine-tuning settings; write ``results.csv``, ``report.md`` and ``plot.png`` under
    ``<ablation folder>/active-learning/<method>``. Returns their paths and the result rows."""
    if cfg.method not in abl.methods or abl.methods[cfg.method].pretrain == "none":
        raise ValueError(f"method {cfg.method!r} must be a pretrained method of ablation {abl.name!r} ({sorted(abl.methods)})")
    folder = abl.folder / "active-learning" / (cfg.method + ("-pool-holdout" if cfg.evaluate_on == "pool-holdout" else ""))
    folder.mkdir(parents=True, exist_ok=True)

    save_config(cfg, folder / "config.yaml")
    pre = run_pretraining(pretrain_config(abl, cfg.method))
    init_net, meta = load_model(pre.checkpoint)
    preprocess = Preprocess(**meta["preprocess"])
    pool = load_pairs(abl.target, "pool")
    images = _pair_images(pool, abl.target.channels, preprocess)  # decoded once, scored every round
    pool, dev = _held_out(pool, cfg)
    if cfg.budgets[-1] > len(pool):
        raise ValueError(f"budget {cfg.budgets[-1]} is larger than the pool of {abl.target.name!r} ({len(pool)} images)")
    with runs.experiment(folder, abl.mlflow, f"active-learning-{abl.name}-{cfg.method}",
                         params={"budgets": str(cfg.budgets), "seeds": str(cfg.seeds), "strategies": ",".join(cfg.strategies),
                                 "sigmas": str(cfg.uncertainty.sigmas), "repeats": cfg.uncertainty.repeats},
                         tags={"medhybrid.stage": "active-learning", "domain": abl.target.name, "ablation": abl.name}) as parent:
        rows: list[dict] = []
        for seed in cfg.seeds:
            for strategy in cfg.strategies:
                selected: list[str] = []
                net = init_net
                for budget in cfg.budgets:
                    if strategy == "random":
                        selected, rho = few_shot_ids([p["id"] for p in pool], budget, seed), math.nan
                    else:
                        selected, rho = _next_round(net, strategy, selected, budget, pool, images, preprocess, abl.target, cfg,
                                                    folder / strategy / f"b{budget}-s{seed}")
                    net, dice = _finetune_and_test(abl, cfg, pre, meta, folder, strategy, budget, seed, selected, parent, dev)
                    rows.append({"strategy": strategy, "budget": budget, "seed": seed, "dice": dice, "ids": " ".join(selected),
                                 "score_error_rho": rho})
                    log.info("active learning %s: %s b%d s%d %s dice %.4f", abl.name, strategy, budget, seed, cfg.scored_on, dice)
        paths = write_active_report(rows, folder, abl.target.name, cfg)
        if parent:
            for p in paths.values():
                tracking.log_artifact(abl.mlflow, parent, p, "report")
            tracking.finish_run(abl.mlflow, parent)
    return {**paths, "rows": rows, "parent_run_id": parent}


def _held_out(pool: list[dict], cfg: ActiveLearningConfig) -> tuple[list[dict], list[dict] | None]:
    """``(selectable pool, development set)``: with ``evaluate_on: pool-holdout``, ``cfg.holdout`` pool images (one
    fixed draw, not a run seed) are never selectable and score every round; else the whole pool is selectable."""
    if cfg.evaluate_on != "pool-holdout":
        return pool, None
    held = set(few_shot_ids([p["id"] for p in pool], cfg.holdout, 10_000))
    return [p for p in pool if p["id"] not in held], [p for p in pool if p["id"] in held]


def _next_round(net: EDMPrecond, strategy: str, selected: list[str], budget: int, pool: list[dict],
                images: dict[str, torch.Tensor], preprocess: Preprocess, target, cfg: ActiveLearningConfig,
                out: Path) -> tuple[list[str], float]:
    """The labelled ids after this round (``selected`` plus the most uncertain, or density-weighted, unlabelled
    images up to ``budget``) and how well the scores tracked the model's errors; the scores go to
    ``out/scores.json``."""
    ids = [p["id"] for p in pool]
    scores = dict(zip(ids, score_images(net, [images[i] for i in ids], cfg.uncertainty), strict=True))
    free = [p for p in pool if p["id"] not in selected]
    rho = score_error_correlation(net, target, preprocess, free, scores)
    if strategy == "density":
        free_ids = [p["id"] for p in free]
        density = information_density(embed_images(net, [images[i] for i in free_ids])).tolist()
        scores = density_weighted({i: scores[i] for i in free_ids}, dict(zip(free_ids, density, strict=True)), cfg.density_beta)
    write_json(out / "scores.json", scores, indent=1)
    return selected + most_uncertain(scores, budget - len(selected), exclude=selected), rho


def score_error_correlation(net: EDMPrecond, dataset, preprocess: Preprocess, pairs: Sequence[dict],
                            scores: dict[str, float]) -> float:
    """Spearman correlation between the uncertainty ``scores`` of ``pairs`` (pool images a round could pick) and the
    model's actual error 1 - Dice on them: does u find the images the model gets wrong? A diagnostic the simulation
    can afford because its pool is labelled; it reads pool labels only, never the test split."""
    if len(pairs) < 3:
        return math.nan
    err = {r["id"]: 1.0 - r["dice"] for r in evaluate(net, dataset, preprocess, "pool", pairs=list(pairs)).rows}
    ids = [p["id"] for p in pairs if not math.isnan(err[p["id"]])]
    return float(spearmanr([scores[i] for i in ids], [err[i] for i in ids]).statistic)


def _finetune_and_test(abl, cfg: ActiveLearningConfig, pre, meta: dict, folder: Path, strategy: str, budget: int, seed: int,
                       ids: list[str], parent: str | None, dev: list[dict] | None = None) -> tuple[EDMPrecond, float]:
    out = folder / strategy / f"b{budget}-s{seed}"
    data = deep_merge(abl.finetune, dict(
        dataset=abl.target.model_dump(), method=f"{cfg.method}-{strategy}", budget=budget, seed=seed, ids=ids,
        init=str(pre.checkpoint), preprocess=meta["preprocess"], model=meta["model"], output_dir=str(out), parent_run_id=parent,
        tags={"strategy": strategy, "active_learning": abl.name, "pretrain_run_id": pre.run_id or ""},
        mlflow=deep_merge(dump_config(abl.mlflow), {"run_name": f"{abl.name}-al-{strategy}-b{budget}-s{seed}"})))
    fcfg = validate(FinetuneConfig, data, source=f"active learning {abl.name} {strategy} b{budget} s{seed}")
    res = run_finetuning(fcfg)
    net, _ = load_model(res.checkpoint)
    st = runs.read_state(fcfg.folder)
    on, scored = runs.scores(st)
    if on == cfg.scored_on:
        return net, float(scored[f"{on}_dice"])
    summary = evaluate_few_shot_run(abl.mlflow, fcfg.folder, res.run_id, net, fcfg.dataset, fcfg.preprocess, dev)
    return net, float(summary[f"{cfg.scored_on}_dice"])


def write_active_report(rows: list[dict], folder: Path, domain: str, cfg: ActiveLearningConfig) -> dict[str, Path]:
    """``results.csv`` (one row per run), ``report.md`` (mean and sd per strategy and budget, each strategy's paired
    difference to random per seed) and ``plot.png``."""
    on = cfg.scored_on  # the column and the axis say which set the Dice is from
    csv_path = folder / "results.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["strategy", "budget", "seed", f"{on}_dice", "score_error_rho", "ids"], extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, f"{on}_dice": r["dice"]} for r in rows)
    dice = {(r["strategy"], r["budget"], r["seed"]): r["dice"] for r in rows}
    strategies = [s for s in cfg.strategies if any(r["strategy"] == s for r in rows)]
    others = [s for s in strategies if s != "random"] if "random" in strategies else []
    md = folder / "report.md"
    md.write_text("\n".join(_strategy_table(dice, strategies, others, domain, cfg) + _findings(rows, dice, others, cfg)) + "\n")
    png = folder / "plot.png"
    _plot_strategies(png, dice, strategies, f"Dice ({domain} {on})", cfg)
    return {"csv": csv_path, "markdown": md, "plot": png}


def _paired_to_random(dice: dict, strategy: str, budgets: Sequence[int], seeds: Sequence[int]) -> list[float]:
    """``strategy`` − random, per (budget, seed) both ran."""
    return [dice[(strategy, b, sd)] - dice[("random", b, sd)] for b in budgets for sd in seeds
            if (strategy, b, sd) in dice and ("random", b, sd) in dice]


def _strategy_table(dice: dict, strategies: list[str], others: list[str], domain: str, cfg: ActiveLearningConfig) -> list[str]:
    """The report's header (what was compared, on which images) and its table: mean ± sd Dice per strategy and budget,
    and each strategy's per-seed difference to random."""
    split = (f"the {domain} test split (never used to choose images)" if cfg.evaluate_on == "test" else
             f"{cfg.holdout} {domain} pool images held out as a development set (never selectable; the test split is not read)")
    lines = [f"# Next-sample strategy on {domain}: labelling order vs random order", "",
             f"Method `{cfg.method}` (its pretrained checkpoint, fine-tuned on the labelled images with medhybrid's few-shot "
             f"fine-tuning), seeds {cfg.seeds}. Dice on {split}. "
             f"Uncertainty u: 1 - mean Dice of the mask under noise sigma in {list(cfg.uncertainty.sigmas)} "
             f"({cfg.uncertainty.repeats} draws each) against the clean mask; `uncertainty` labels the highest u first"
             + (f", `density` the highest u * density^{cfg.density_beta:g} (density: mean cosine similarity of the bottleneck "
                "features to the other unlabelled images)" if "density" in strategies else "")
             + ", rescoring after each round's fine-tuning; `random` labels seeded random subsets "
             "(the ablation's, when scored on test).", "",
             "| labels | " + " | ".join(strategies) + "".join(f" | {s} - random (per seed)" for s in others) + " |",
             "|---|" + "---|" * (len(strategies) + len(others))]
    for b in cfg.budgets:
        cells = []
        for s in strategies:
            v = [dice[(s, b, sd)] for sd in cfg.seeds if (s, b, sd) in dice]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–")
        for s in others:
            d = _paired_to_random(dice, s, [b], cfg.seeds)
            cells.append(f"{np.mean(d):+.3f} ({', '.join(f'{x:+.3f}' for x in d)})" if d else "–")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines


def _findings(rows: list[dict], dice: dict, others: list[str], cfg: ActiveLearningConfig) -> list[str]:
    """Each strategy against random pooled over budgets and seeds (sign test), and whether its uncertainty found the
    model's mistakes (Spearman correlation of u with 1 - Dice)."""
    lines = []
    for s in others:
        d = _paired_to_random(dice, s, cfg.budgets, cfg.seeds)
        if d:
            lines += ["", f"`{s}` pooled over budgets and seeds: mean difference to random {np.mean(d):+.4f}, ahead in "
                      f"{sum(x > 0 for x in d)} of {len(d)} pairs (sign test p = {_sign_test(d):.3f})."]
    for s in others:
        rho = {b: [r["score_error_rho"] for r in rows if r["strategy"] == s and r["budget"] == b
                   and not math.isnan(r.get("score_error_rho", math.nan))] for b in cfg.budgets}
        if any(rho.values()):
            chose = "; ".join(f"{b} labels {np.mean(v):+.2f}" for b, v in rho.items() if v)
            lines += ["", f"Does u find the model's mistakes (`{s}` runs)? Spearman correlation between u and 1 - Dice over "
                      "the unlabelled pool images under the model that chose each round (the pretrained network for the "
                      f"first round, then the previous round's fine-tuned one), mean over seeds: {chose}."]
    return lines


def _plot_strategies(path: Path, dice: dict, strategies: list[str], ylabel: str, cfg: ActiveLearningConfig) -> None:
    """Mean Dice against labelled images, one line per strategy."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for s in strategies:
        m = [np.mean([dice[(s, b, sd)] for sd in cfg.seeds if (s, b, sd) in dice] or [math.nan]) for b in cfg.budgets]
        ax.plot(cfg.budgets, m, marker="o", label=s)
    ax.set_xscale("log")
    ax.set_xticks(cfg.budgets, [str(b) for b in cfg.budgets])
    ax.minorticks_off()
    ax.set_xlabel("labelled images")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _sign_test(diffs: Sequence[float]) -> float:
    """Two-sided sign test of ``diffs`` against 0 (ties dropped)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return float(binomtest(pos, pos + neg).pvalue) if pos + neg else 1.0


__all__ = ["ActiveLearningConfig", "density_weighted", "embed_images", "information_density", "most_uncertain",
           "run_active_learning", "score_error_correlation", "write_active_report"]
