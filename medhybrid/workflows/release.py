"""Released weights that keep what the pretraining knew: weight-space ensembling of a bundle's pretrained and fine-tuned
weights (WiSE-FT, Wortsman et al. 2022), its mixing weight chosen without the target's test split.

Fine-tuning on a small target pool costs what the network knew of the source domain and of images unlike the pool
(other clinics' photographs, diseased lungs). WiSE-FT interpolates the two sets of weights of the same network::

    theta(alpha) = (1 - alpha) * theta_pretrained + alpha * theta_finetuned        (Wortsman et al. 2022, eq. 1)

``alpha = 1`` is the fine-tuned network, ``alpha = 0`` the pretrained one (whose mask output is the source domain's).

:func:`choose_alpha` (``medhybrid release``) chooses ``alpha`` the way a user can, without test images:

1. the target's pool is split in two (seeded): the bundle's own ``train.json`` fine-tunes ``models/pretrained.pt`` on
   one half (labels only: the other half is scored, so it is never read, not even unlabelled);
2. every ``alpha`` of the grid is scored on the source's validation split and on the other half of the pool (the
   development set); the chosen ``alpha`` has the best source Dice among those within ``tolerance`` (0.01) of the best
   development Dice (``criterion: target-tolerance``: the target's users lose at most that), or, with
   ``criterion: mean``, the best mean of the two. The mean lets a source whose masks follow another convention (V7's
   lungs include the lung behind the heart, OpenIST's do not) buy its convention with the target's accuracy;
3. the released ``models/model.pt`` (fine-tuned on the whole pool) is interpolated with that ``alpha``.

The report also scores the result on the target's test split (reported, never used to choose) and checks the quality
CSV's uncertainty against per-image Dice there (Spearman correlation).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from medhybrid.core.config import StrictModel
from medhybrid.core.files import write_json
from medhybrid.data.datasets import few_shot_ids, load_pairs
from medhybrid.data.io import DataError
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.networks.checkpoints import interpolate_weights, read_model_file
from medhybrid.workflows.bundle import save_weights, weights_note
from medhybrid.workflows.evaluate import evaluate
from medhybrid.workflows.inference import bundle_segmenter, infer_files
from medhybrid.workflows.quality import rank_correlation

__all__ = ["ReleaseConfig", "choose_alpha"]

log = logging.getLogger("medhybrid")


class ReleaseConfig(StrictModel):
    """``medhybrid release``: choose a bundle's WiSE-FT mixing weight on development data and write the result."""

    bundle: Path = Field(description="bundle folder with models/pretrained.pt and models/model.pt")
    source: str = Field(description="the pretraining's dataset (shipped name or YAML), scored on source_split")
    source_split: str = "val"
    target: str = Field(description="the fine-tuning's dataset (shipped name or YAML): its pool is split in two")
    dev_fraction: float = Field(0.5, gt=0, lt=1, description="share of the pool held out as the development set")
    alphas: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], description="WiSE-FT mixing weights to score")
    criterion: Literal["target-tolerance", "mean"] = Field(
        "target-tolerance", description="target-tolerance: the best source Dice within `tolerance` of the best development "
        "Dice; mean: the best mean of the two")
    tolerance: float = Field(0.01, ge=0, description="development Dice the target may lose (target-tolerance)")
    seed: int = 0
    output_dir: Path = Field(description="report (release.json, release.md) and the interpolated weights")
    write_bundle: bool = Field(False, description="replace the bundle's models/model.pt with the chosen interpolation")
    train_args: list[str] = Field(default_factory=list, description="further `monai.bundle run` arguments for the "
                                  "half's training, e.g. ['--max_iterations', '20']")


def _score(net, spec, preprocess: Preprocess, pairs: list[dict], name: str) -> tuple[float, list[dict]]:
    res = evaluate(net, spec, preprocess, name, pairs=pairs)
    return res.mean("dice"), res.rows


def _fine_tune_half(cfg: ReleaseConfig, train_ids: Sequence[str], work: Path) -> Path:
    """The bundle's ``train.json`` on the pool images ``train_ids`` (labels only), from ``models/pretrained.pt``; its own
    WiSE-FT off (``wise=1``): the trained weights are what the grid interpolates."""
    pairs = {p["id"]: p for p in load_pairs(load_dataset_spec(cfg.target), "pool")}
    work = work.resolve()
    datalist = work / "half.json"
    datalist.write_text(json.dumps({"training": [{"image": pairs[i]["image"], "label": pairs[i]["label"]} for i in train_ids]}))
    out = work / "half_model.pt"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--meta_file",
           "configs/metadata.json", "--dataset_dir", str(datalist), "--train_split", "train", "--semi_algorithm", "none",
           "--adapt", "False", "--wise", "1", "--model_path", str(out), "--output_dir", str(work / "train"),
           "--seed", str(cfg.seed), *cfg.train_args]
    log.info("release: fine-tuning %s on %d of the pool's images", cfg.bundle.name, len(train_ids))
    res = subprocess.run(cmd, cwd=Path(cfg.bundle).resolve(), capture_output=True, text=True)
    if res.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the bundle's train.json failed:\n{res.stderr[-3000:]}")
    return out


def _require_plain(weights: Path) -> None:
    """Release mixes plain fine-tuned weights with the pretrained ones: a file whose note says it is already a mix (or
    says nothing) is refused in one line, before anything runs."""
    note = weights_note(weights)
    if note is None:
        raise DataError(weights, "has no note saying what it holds (models/model.pt.json): release mixes plain fine-tuned "
                        "weights; write them with the bundle's train.json --wise 1 --adapt False")
    if note.get("holds") != "trained":
        raise DataError(weights, f"holds {note.get('holds')} weights (WiSE-FT {note.get('wise')} with "
                        f"{note.get('start')}, by {note.get('by')}), not plain fine-tuned ones: mixing them again would mix "
                        "twice; retrain with the bundle's train.json --wise 1 --adapt False")


def choose_alpha(cfg: ReleaseConfig) -> dict:
    """Choose alpha on the source's validation split and the pool's development half; interpolate the released
    weights with it; score them on the target's test split (reported only). Returns the report (also written)."""
    bundle = Path(cfg.bundle).resolve()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pretrained = read_model_file(bundle / "models" / "pretrained.pt", allow_bare=True)
    _require_plain(bundle / "models" / "model.pt")
    released = read_model_file(bundle / "models" / "model.pt", allow_bare=True)
    net, meta = bundle_segmenter(bundle)
    preprocess = Preprocess(**meta["preprocess"])
    source, target = load_dataset_spec(cfg.source), load_dataset_spec(cfg.target)
    source_pairs = load_pairs(source, cfg.source_split)
    pool = load_pairs(target, "pool")
    dev_ids = set(few_shot_ids([p["id"] for p in pool], round(cfg.dev_fraction * len(pool)), cfg.seed + 104729))
    dev = [p for p in pool if p["id"] in dev_ids]
    train_ids = [p["id"] for p in pool if p["id"] not in dev_ids]

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        half = read_model_file(_fine_tune_half(cfg, train_ids, Path(tmp)), allow_bare=True)
    grid = []
    for a in cfg.alphas:
        net.load_state_dict(interpolate_weights(pretrained, half, a))
        s, _ = _score(net, source, preprocess, source_pairs, "dev")
        t, _ = _score(net, target, preprocess, dev, "dev")
        grid.append({"alpha": a, "source_val_dice": s, "target_dev_dice": t, "mean": (s + t) / 2})
        log.info("release: alpha %.2f: %s %s Dice %.4f, %s development Dice %.4f", a, cfg.source, cfg.source_split, s,
                 cfg.target, t)
    if cfg.criterion == "mean":
        best = max(grid, key=lambda r: (r["mean"], r["alpha"]))
    else:
        top = max(r["target_dev_dice"] for r in grid)
        best = max((r for r in grid if r["target_dev_dice"] >= top - cfg.tolerance),
                   key=lambda r: (r["source_val_dice"], r["alpha"]))
    alpha = best["alpha"]

    test = load_pairs(target, "test")
    final, per_image = {}, {}
    for name, a in (("released", 1.0), ("chosen", alpha), ("pretrained", 0.0)):
        net.load_state_dict(interpolate_weights(pretrained, released, a))
        s, _ = _score(net, source, preprocess, source_pairs, "dev")
        t, rows = _score(net, target, preprocess, test, "test")
        final[name] = {"alpha": a, "source_val_dice": s, "target_test_dice": t}
        per_image[name] = {r["id"]: r["dice"] for r in rows}
    chosen = interpolate_weights(pretrained, released, alpha)
    net.load_state_dict(chosen)
    weights = save_weights(net, out / "model.pt")
    per_image = per_image["chosen"]
    # the quality CSV of the chosen weights on the test images: does the uncertainty rank the worst masks first?
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp_bundle = _bundle_with(bundle, weights, Path(tmp))
        q = infer_files(tmp_bundle, [p["image"] for p in test], Path(tmp) / "masks")
        with open(q.quality_csv, newline="") as fh:
            u = {Path(r["image"]).stem: float(r["uncertainty"]) for r in csv.DictReader(fh) if r["status"] == "ok"}
    ids = [i for i in per_image if i in u]
    rho = rank_correlation([u[i] for i in ids], [per_image[i] for i in ids])
    worst = sorted(ids, key=lambda i: per_image[i])[: max(1, len(ids) // 10)]
    top = set(sorted(ids, key=lambda i: -u[i])[: max(1, len(ids) // 5)])
    report = {"bundle": bundle.name, "source": f"{cfg.source} {cfg.source_split}", "target": cfg.target,
              "development": {"train_images": len(train_ids), "dev_images": len(dev), "seed": cfg.seed},
              "criterion": cfg.criterion, "tolerance": cfg.tolerance, "grid": grid, "chosen_alpha": alpha, "final": final,
              "uncertainty": {"spearman_u_vs_dice": rho, "images": len(ids),
                              "worst_tenth_in_top_fifth_by_u": sum(i in top for i in worst), "worst_tenth": len(worst)}}
    write_json(out / "release.json", report)
    (out / "release.md").write_text(_markdown(report))
    if cfg.write_bundle:
        save_weights(net, bundle / "models" / "model.pt",  # net holds the chosen weights
                     note={"holds": "mixed", "wise": alpha, "start": "models/pretrained.pt", "by": "medhybrid release"})
    return report


def _bundle_with(bundle: Path, weights: Path, folder: Path) -> Path:
    """A copy of ``bundle``'s configs with ``weights`` as its model.pt (links, nothing large copied)."""
    dst = folder / bundle.name
    (dst / "models").mkdir(parents=True)
    os.symlink((bundle / "configs").resolve(), dst / "configs")
    os.symlink(Path(weights).resolve(), dst / "models" / "model.pt")
    return dst


def _markdown(r: dict) -> str:
    f = r["final"]
    lines = [f"# {r['bundle']}: WiSE-FT mixing weight", "",
             f"Chosen on {r['source']} and a development half of the {r['target']} pool ({r['development']['dev_images']} "
             f"images; the bundle's train.json fine-tuned on the other {r['development']['train_images']}), never on test.",
             "", "| alpha | source val Dice | target dev Dice | mean |", "|---|---|---|---|"]
    lines += [f"| {g['alpha']:.2f} | {g['source_val_dice']:.4f} | {g['target_dev_dice']:.4f} | {g['mean']:.4f} |"
              for g in r["grid"]]
    rule = ("the best source Dice among the mixing weights within "
            f"{r['tolerance']:.2f} of the best development Dice" if r["criterion"] == "target-tolerance"
            else "the best mean of the two")
    lines += ["", f"Chosen alpha ({rule}): **{r['chosen_alpha']:.2f}**. The released weights (fine-tuned on the whole pool) "
              "interpolated with it:", "", "| weights | alpha | source val Dice | target test Dice |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['alpha']:.2f} | {v['source_val_dice']:.4f} | {v['target_test_dice']:.4f} |" for k, v in f.items()]
    u = r["uncertainty"]
    rho = "n/a" if math.isnan(u["spearman_u_vs_dice"]) else f"{u['spearman_u_vs_dice']:+.3f}"
    lines += ["", f"Quality CSV on the {u['images']} test images (chosen weights): Spearman correlation of the uncertainty "
              f"with Dice {rho}; {u['worst_tenth_in_top_fifth_by_u']} of the {u['worst_tenth']} worst masks are in the "
              "fifth of images the CSV lists first.", ""]
    return "\n".join(lines)
