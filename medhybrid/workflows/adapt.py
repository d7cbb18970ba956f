"""Self-checking few-shot adaptation: a model is replaced by a fine-tune only when the user's own labels say so.

Whether a few labels help depends on the target: on PH2 the hybrid pretraining's mask head, used as it is, beat every
fine-tune at 1-5 labels; on OpenIST one label lifted it from 0.89 to 0.93 Dice. A user with k labels has no test set,
but the labels themselves are a free held-out check of the starting model, which never saw them. So
:func:`run_adaptation`:

1. scores the starting model on each of the k labelled images;
2. for k >= 2, holds out each labelled image in turn (leave-one-out up to ``max_loo`` labels, ``folds``-fold beyond),
   trains each recipe of a small fixed menu on the rest (plain fine-tuning, robust fine-tuning, FixMatch when there
   are unlabelled images) and scores it on what was held out, at each WiSE-FT mixing weight (Wortsman et al. 2022,
   eq. 1: ``(1 - a) * start + a * fine-tuned``, forward passes only);
3. switches away from the start only when the held-out, paired evidence passes the rule fixed in advance
   (:class:`AdaptRule`, :func:`decide`): a candidate qualifies when its mean held-out gain over the start is at least
   ``min_gain`` Dice and the gain is positive in at least ``min_share`` of the folds, and the qualifying candidate
   with the highest mean held-out Dice is chosen; with 2 labels (``rule.label_check_up_to``) a switch also needs
   the labels' check of the start below (:func:`labels_check`), since each fold then learns from one label and is
   checked on one (docs/results/k2-dev);
4. with k = 1 there is no held-out check of a fine-tune, but the label checks the start: when at least half of the
   pixels the start gets wrong on it are ones it is sure of (a systematic difference: the user's masks draw the
   boundary elsewhere, as OpenIST's leave out the lung behind the heart), the robust recipe (L2-SP, alpha 1) trained
   on the label replaces it; otherwise (errors where the boundary is unsure, as on PH2) the start is kept
   (:func:`single_label_decision`, chosen on development sets of both targets: docs/results/k1-dev);
5. trains the chosen candidate on all k labels and writes ``model.pt`` (its ``meta["adapt"]`` says what was decided),
   ``report.md`` and ``report.json`` (every candidate's held-out Dice with its interval, the decision and its reason)
   and one MLflow run, the fold fine-tunes its children.

The fold that holds an image out never trains on it, not even as an unlabelled image. Nor may the start have: a model
that an earlier adaptation trained on some of these labels is refused (its ``meta["adapt"]``, or a bundle's weights
note, lists the content hashes of the images it was adapted on); adapt the model it started from with all the labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from medhybrid.core import runs, tracking
from medhybrid.core.config import StrictModel, apply_overrides, deep_merge, dump_config, validate
from medhybrid.core.files import atomic_write, sha256, write_json
from medhybrid.core.stats import paired_bootstrap
from medhybrid.core.tracking import MLflowConfig
from medhybrid.data.check import require_readable_images, require_valid
from medhybrid.data.datasets import load_pairs
from medhybrid.data.io import SUPPORTED_SUFFIXES, DataError, file_suffix, image_stem
from medhybrid.data.specs import DatasetSpec, Preprocess, load_dataset_spec
from medhybrid.data.transforms import IGNORE_INDEX, preprocessing
from medhybrid.data.unlabelled import HELD_OUT_SPLITS
from medhybrid.networks.checkpoints import interpolate_weights, load_model, read_model_file, save_model, weights_note
from medhybrid.networks.nets import ModelConfig, build_network
from medhybrid.workflows.evaluate import evaluate, predict
from medhybrid.workflows.finetune import FinetuneConfig, run_finetuning
from medhybrid.workflows.inference import bundle_segmenter

log = logging.getLogger("medhybrid")

KEEP = "start"
"""The candidate that keeps the starting model as it is."""

ROBUST_RECIPE: dict[str, Any] = {"robust": {"l2sp_alpha": 1.0}}
"""The menu's robust fine-tuning: L2-SP (Li et al. 2018, eq. 4) pulling the weights towards the start, alpha = 1,
chosen on development sets (pool images outside the few-shot subsets, never test) of 0.1, 1 and 100, and beside
partial fine-tuning and source rehearsal (docs/results/robust-dev/)."""

FIXMATCH_RECIPE: dict[str, Any] = {"semi": {"algorithm": "fixmatch", "threshold": 0.8}}
"""The menu's semi-supervised recipe, with the threshold chosen on development sets of both targets (semi-dev)."""


class AdaptRule(StrictModel):
    """The decision rule, fixed before any candidate is scored."""

    min_gain: float = Field(0.01, description="least mean held-out Dice gain over the start to switch (negative: a "
                            "fine-tune may lose that much and still be chosen)")
    min_share: float = Field(2 / 3, ge=0, le=1, description="least share of folds in which the gain is positive")
    single_label_recipe: str = Field("robust", description="k = 1, no held-out check possible: the recipe trained on "
                                     "the one label (a name of `recipes`)")
    single_label_wise: float = Field(0.5, ge=0, le=1, description="k = 1 with single_label_check off: the mixing "
                                     "weight of that fine-tune with the start (0 keeps the start); 0.5 has the smallest "
                                     "worst-case loss over both targets' development sets (docs/results/k1-dev)")
    single_label_check: float | None = Field(0.5, ge=0, le=1, description="k = 1: the one label checks the start "
                                             "instead: when at least this share of the pixels the start gets wrong on it "
                                             "are pixels it is sure of (`sure`), the labels follow another convention, "
                                             "which one label can teach: the single-label recipe, unmixed, replaces the "
                                             "start; otherwise the start is kept. None: always the recipe mixed at "
                                             "single_label_wise (docs/results/k1-dev). The same threshold checks a "
                                             "switch up to label_check_up_to labels; None turns that off too")
    sure: float = Field(0.9, gt=0.5, lt=1, description="a pixel the start is sure of: foreground probability at least "
                        "this, or at most 1 - this")
    label_check_up_to: int = Field(2, ge=1, description="up to this many labels, a switch the held-out rule allows also "
                                   "needs the labels' check of the start (single_label_check, over all the labels' "
                                   "pixels): with 2 labels every fold's fine-tune learns from one label and is checked on "
                                   "one, so two unusual labels can agree with each other and mislead the held-out rule. "
                                   "1: the held-out rule alone from 2 labels (docs/results/k2-dev)")

    def checks_labels(self, k: int) -> bool:
        """Whether the labels' check of the start applies to a switch at ``k`` (>= 2) labels."""
        return self.single_label_check is not None and k <= self.label_check_up_to


class AdaptConfig(StrictModel):
    """``medhybrid adapt``: a starting model, the user's labelled (and unlabelled) images, and the menu."""

    model: Path = Field(description="the starting model: a medhybrid model.pt, or a medhybrid bundle's folder")
    weights: Path | None = Field(None, description="a bundle's weights file to start from (None: its models/model.pt)")
    data: DatasetSpec = Field(description="the labelled images (the pool split of this dataset)")
    labelled: list[str] | None = Field(None, description="the pool ids that count as labelled (None: all of the pool)")
    unlabelled_images: list[str] = Field(default_factory=list, description="image files without masks (FixMatch)")
    unlabelled_pool: bool = Field(False, description="the pool's images outside `labelled` are unlabelled images too "
                                  "(the ablation: a subset of a labelled pool)")
    unlabelled_exclude: list[str] = Field(default_factory=list, description="pool ids never read (a development set)")
    output_dir: Path = Path("adapted")
    recipes: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"plain": {}, "robust": ROBUST_RECIPE, "fixmatch": FIXMATCH_RECIPE},
        description="the trained candidates: name -> FinetuneConfig overrides of the one fine-tuning recipe "
        "(fixmatch is left out when there is no unlabelled image)")
    wise: tuple[float, ...] = Field((0.25, 0.5, 0.75, 1.0), description="WiSE-FT mixing weights tried on every "
                                    "trained candidate (1: the fine-tune itself)")
    rule: AdaptRule = Field(default_factory=AdaptRule)
    max_loo: int = Field(10, ge=2, description="leave-one-out up to this many labels; folds beyond")
    folds: int = Field(5, ge=2, description="folds when there are more than max_loo labels")
    finetune: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig overrides for every candidate")
    seed: int = 0
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    parent_run_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    progress: bool = Field(True, description="a progress bar on a terminal")
    check_data: bool = Field(True, description="open and check every labelled image and mask before training")

    @property
    def folder(self) -> Path:
        return Path(self.output_dir)

    @property
    def dataset(self) -> DatasetSpec:
        return self.data

    @model_validator(mode="after")
    def _check(self):
        if not all(0 <= a <= 1 for a in self.wise):
            raise ValueError(f"wise mixing weights must lie in [0, 1], got {list(self.wise)}")
        if not self.recipes:
            raise ValueError("recipes: at least one trained candidate")
        return self


# --------------------------------------------------------------------------------------------- the decision
@dataclass
class Candidate:
    """One candidate's held-out scores: per fold, its mean Dice on the fold's held-out images."""

    name: str
    recipe: str | None
    wise: float | None
    dice: list[float]
    gain: list[float] = field(default_factory=list)

    def summary(self, seed: int = 0) -> dict:
        d, g = np.asarray(self.dice, float), np.asarray(self.gain, float)
        out = {"name": self.name, "recipe": self.recipe, "wise": self.wise, "folds": len(d),
               "dice": float(d.mean()) if len(d) else math.nan}
        if len(d) >= 2:
            r = paired_bootstrap([d], seed=seed)
            out.update(dice_low=r.low, dice_high=r.high)
        if len(g):
            out.update(gain=float(g.mean()), positive_share=float((g > 0).mean()))
            if len(g) >= 2:
                r = paired_bootstrap([g], seed=seed)
                out.update(gain_low=r.low, gain_high=r.high)
        return out


@dataclass
class Decision:
    choice: str
    reason: str
    candidates: list[dict]


def decide(start: Sequence[float], trained: Mapping[str, Sequence[float]], rule: AdaptRule, seed: int = 0) -> Decision:
    """The rule, on paired held-out Dice per fold: ``start`` (the starting model) and each trained candidate
    (name -> per-fold Dice, the folds in the same order). A candidate qualifies when its mean gain over the start is at
    least ``rule.min_gain`` and the gain is positive in at least ``rule.min_share`` of the folds; the qualifying
    candidate with the highest mean held-out Dice is chosen (ties: the first listed), else the start is kept."""
    s = np.asarray(start, float)
    cands = [Candidate(KEEP, None, None, list(s), [0.0] * len(s))]
    for name, dice in trained.items():
        d = np.asarray(dice, float)
        if d.shape != s.shape:
            raise ValueError(f"candidate {name}: {len(d)} folds, the start has {len(s)}")
        cands.append(Candidate(name, None, None, list(d), list(d - s)))
    summaries = [c.summary(seed) for c in cands]
    ok = [x for x in summaries[1:] if x["gain"] >= rule.min_gain - 1e-12 and x["positive_share"] >= rule.min_share - 1e-12]
    best = max(summaries[1:], key=lambda x: x["dice"], default=None)
    if ok:
        chosen = max(ok, key=lambda x: x["dice"])
        reason = (f"{chosen['name']} gains {chosen['gain']:+.3f} Dice over the start on held-out labels (at least "
                  f"{rule.min_gain:.3f} needed), positive in {chosen['positive_share']:.0%} of {chosen['folds']} folds "
                  f"(at least {rule.min_share:.0%} needed)")
        return Decision(chosen["name"], reason, summaries)
    if best is None:
        return Decision(KEEP, "no trained candidate", summaries)
    reason = (f"kept the start: the best candidate, {best['name']}, gains {best['gain']:+.3f} Dice over it on held-out "
              f"labels, positive in {best['positive_share']:.0%} of {best['folds']} folds; switching needs a gain of at "
              f"least {rule.min_gain:.3f} positive in at least {rule.min_share:.0%} of the folds")
    return Decision(KEEP, reason, summaries)


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """Mask logits (B, C, H, W) as each pixel's probability of foreground (B, H, W): the sigmoid of one channel, else
    one minus the softmax's background (the same side of 0.5 as :func:`~medhybrid.networks.nets.mask_classes` for
    one channel and for two)."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return 1 - torch.softmax(logits, 1)[:, 0]


def confident_error_share(prob: torch.Tensor, label: torch.Tensor, sure: float = 0.9) -> float:
    """Of the pixels a model gets wrong against ``label`` (its foreground ``prob`` on the wrong side of 0.5; label
    pixels at IGNORE_INDEX, the padding, left out), the share it is sure of: probability at least ``sure`` or at most
    ``1 - sure``. NaN when it gets no pixel wrong. Errors a model is sure of are systematic: the label draws the
    boundary elsewhere than the model learnt to (another convention); errors it is unsure of lie where the boundary is
    ambiguous."""
    valid = label != IGNORE_INDEX
    wrong = ((prob > 0.5) != (label > 0)) & valid
    n = int(wrong.sum())
    if n == 0:
        return math.nan
    sure_px = (prob >= sure) | (prob <= 1 - sure)
    return float((wrong & sure_px).sum()) / n


def start_confident_errors(net, dataset: DatasetSpec, preprocess: Preprocess, pairs: Sequence[Mapping[str, str]],
                           sure: float = 0.9) -> float:
    """:func:`confident_error_share` of ``net`` over all the pixels of the labelled ``pairs``, at the resolution it
    reads images."""
    pre = preprocessing(dataset, preprocess)
    probs, labels = [], []
    for pair in pairs:
        item = pre(dict(pair))
        probs.append(foreground_probability(predict(net, item["image"][None]))[0].flatten())
        labels.append(torch.as_tensor(item["label"])[0].flatten())
    return confident_error_share(torch.cat(probs), torch.cat(labels), sure)


def _share_seen(share: float) -> str:
    return ("it gets no pixel wrong" if math.isnan(share)
            else f"{share:.0%} of the pixels it gets wrong are ones it is sure of")


def _unsure(share: float, rule: AdaptRule) -> str:
    """Why a share below the rule's keeps the start."""
    if math.isnan(share):
        return "it gets no pixel wrong, so there is nothing the labels could teach it"
    return (f"{_share_seen(share)} (below {rule.single_label_check:.0%}): its errors lie where the boundary is unsure, "
            "which so few labels cannot teach")


def labels_check(rule: AdaptRule, share: float, decision: Decision, k: int) -> Decision:
    """The held-out ``decision`` at ``k`` labels, checked by the labels themselves up to ``rule.label_check_up_to``
    labels: a switch stands only when at least ``rule.single_label_check`` of the pixels the start gets wrong on them
    (``share``, :func:`confident_error_share`) are ones it is sure of, the sign of a convention the labels teach.
    Below that, the start's errors lie where the boundary is unsure, and with so few labels a held-out gain can come
    from two unusual images that agree with each other (docs/results/k2-dev): the start is kept."""
    if decision.choice == KEEP or not rule.checks_labels(k):
        return decision
    if not math.isnan(share) and share >= rule.single_label_check:
        return Decision(decision.choice, f"{decision.reason}; the labels check the start too: {_share_seen(share)} (at "
                        f"least {rule.single_label_check:.0%} needed up to {rule.label_check_up_to} labels)",
                        decision.candidates)
    reason = (f"kept the start: {decision.choice} passed the held-out rule ({decision.reason}), but with {k} labels the "
              f"labels must also check the start, and {_unsure(share, rule)}; label more images to let the held-out "
              "rule decide alone")
    return Decision(KEEP, reason, decision.candidates)


def single_label_decision(rule: AdaptRule, share: float, candidates: list[dict]) -> Decision:
    """The decision with one label, where no fine-tune can be checked: by the start's errors on the label
    (``share``, :func:`confident_error_share`) when ``rule.single_label_check`` is set, else the fixed mix."""
    r = rule.single_label_recipe
    if rule.single_label_check is None:
        a = rule.single_label_wise
        choice = KEEP if a == 0 else _name(r, a)
        mix = f" mixed with the start at {a:g} (WiSE-FT)" if a < 1 else ""
        reason = ("one label: no held-out check of a fine-tune is possible; "
                  + ("kept the start (rule.single_label_wise = 0)" if choice == KEEP else
                     f"the {r} recipe on it{mix} (rule.single_label_check off); label a second image to let adapt "
                     "check its choice"))
        return Decision(choice, reason, candidates)
    seen = _share_seen(share)
    if not math.isnan(share) and share >= rule.single_label_check:
        reason = (f"one label: no fine-tune can be checked, but the label checks the start: {seen} (at least "
                  f"{rule.single_label_check:.0%} switches), so your masks draw the boundary elsewhere than it learnt "
                  f"to, which one label can teach: the {r} recipe on it")
        return Decision(_name(r, 1.0), reason, candidates)
    reason = (f"one label: no fine-tune can be checked, but the label checks the start: {_unsure(share, rule)}, and a "
              "fine-tune on one label can spoil what the start knows: kept the start; label a second image to let "
              "adapt check a fine-tune")
    return Decision(KEEP, reason, candidates)


def fold_split(ids: Sequence[str], max_loo: int, folds: int, seed: int) -> list[list[str]]:
    """The held-out ids of each fold: every id alone (leave-one-out) up to ``max_loo`` ids, else ``folds`` groups of
    a seeded shuffle (at most one group per id). Every id is held out exactly once, and no fold is empty."""
    ids = list(ids)
    if len(ids) <= max_loo:
        return [[i] for i in ids]
    folds = min(folds, len(ids))
    order = [ids[j] for j in np.random.default_rng(seed).permutation(len(ids))]
    return [sorted(order[f::folds]) for f in range(folds)]


# --------------------------------------------------------------------------------------------- the user's data
def pairs_dataset(pairs: Sequence[Mapping[str, str]], channels: int, work: Path, name: str = "adapt",
                  mask: Mapping[str, Any] | None = None, overrides: list[str] | None = None) -> DatasetSpec:
    """Labelled ``pairs`` (``{"image", "label"[, "id"]}``) as the ``pool`` split of a dataset written under ``work``
    (a decathlon JSON), with the mask reading ``mask`` (a :class:`~medhybrid.data.specs.MaskSpec` mapping) and
    ``overrides`` (``mask.values={0: 0, 1: 1}`` ...)."""
    items = [{"id": q.get("id") or image_stem(q["image"]), "image": str(Path(q["image"]).resolve()),
              "label": str(Path(q["label"]).resolve())} for q in pairs]
    work.mkdir(parents=True, exist_ok=True)
    # named by its content: another adaptation's data, in the same folder, never overwrites a running one's
    text = json.dumps({"pool": items}, indent=1)
    datalist = f"datalist-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    if not (work / datalist).is_file():
        with atomic_write(work / datalist) as tmp:
            tmp.write_text(text)
    data = {"name": name, "role": "target", "root": str(work.resolve()), "datalist": datalist, "split": None,
            "required_splits": ["pool"], "channels": channels, **({"mask": dict(mask)} if mask else {})}
    data = apply_overrides(data, [o for o in (overrides or []) if not o.startswith(("channels=", "role=", "split="))])
    return validate(DatasetSpec, data, source=f"adapt data ({name})")


def folder_dataset(folder: str | Path, channels: int, work: Path, overrides: list[str] | None = None
                   ) -> tuple[DatasetSpec, list[str]]:
    """The user's folder as a dataset: ``images/`` and ``masks/`` (a mask named like its image, any supported type;
    an image without a mask is unlabelled), or a CSV or decathlon JSON datalist (every row labelled). Returns the
    labelled images as the ``pool`` split of a dataset written under ``work`` (:func:`pairs_dataset`) and the
    unlabelled image files. A dataset with a ``test`` split (a shipped one, a dataset YAML) gives its other splits
    only: a test split is never adapted on. Raises :class:`DataError` naming the folder when it holds no labelled
    image."""
    folder = Path(folder)
    mask = None
    if folder.is_file() or not (folder / "images").is_dir():
        spec = load_dataset_spec(folder, [*(overrides or []), f"channels={channels}", "role=target", "required_splits=[]"])
        pairs = load_pairs(spec)
        held = [p for p in pairs if p.get("split") in HELD_OUT_SPLITS]
        if held:
            log.info("adapt: %s: the %d image(s) of split(s) %s left out: a test split is never adapted on", folder,
                     len(held), sorted({p["split"] for p in held}))
        pairs = [p for p in pairs if p.get("split") not in HELD_OUT_SPLITS]
        labelled = [p for p in pairs if p.get("label")]
        unlabelled = [str(Path(p["image"]).resolve()) for p in pairs if not p.get("label")]
        mask = spec.mask.model_dump()
    else:
        masks = folder / "masks"
        by_stem: dict[str, Path] = {}
        if masks.is_dir():
            for m in sorted(masks.iterdir()):
                if m.is_file() and file_suffix(m) in SUPPORTED_SUFFIXES:
                    by_stem.setdefault(image_stem(m), m)
        labelled, unlabelled = [], []
        for f in sorted((folder / "images").iterdir()):
            if not f.is_file() or f.name.startswith(".") or file_suffix(f) not in SUPPORTED_SUFFIXES:
                continue
            m = by_stem.get(image_stem(f))
            (labelled.append({"image": str(f), "label": str(m), "id": image_stem(f)}) if m
             else unlabelled.append(str(f.resolve())))
    if not labelled:
        raise DataError(folder, "holds no labelled image: put masks named like their images in masks/ (an image "
                        "without a mask counts as unlabelled)")
    return pairs_dataset(labelled, channels, work, folder.resolve().name, mask, overrides), unlabelled


def starting_channels(model: str | Path) -> int:
    """The image channels the starting model (a model.pt or a bundle's folder) takes."""
    model = Path(model)
    if model.is_dir():
        return bundle_segmenter(model)[1]["image_channels"]
    return int(read_model_file(model)["meta"]["image_channels"])


def starting_model(model: str | Path, work: Path, weights: str | Path | None = None) -> Path:
    """A medhybrid ``model.pt`` of the starting model: the file itself, or, for a medhybrid bundle's folder, its
    ``models/model.pt`` (or ``weights``) with the network its ``configs/inference.json`` declares, written under
    ``work`` as ``start-<hash of the weights>.pt``: another start in the same folder never overwrites it."""
    model = Path(model)
    if not model.is_dir():
        read_model_file(model)  # a clear error now, not after the folds
        return model
    src = Path(weights) if weights else model / "models" / "model.pt"
    if not src.is_file():
        raise DataError(src, "model file not found")
    out = work / f"start-{sha256(src)[:12]}.pt"
    if out.is_file():
        return out
    net, meta = bundle_segmenter(model, weights)
    backbone = json.loads((model / "configs" / "inference.json").read_text())["network_def"]["backbone"]
    mcfg = ModelConfig(channels=tuple(backbone["channels"]), attention_levels=tuple(backbone["attention_levels"]),
                       num_res_blocks=backbone["num_res_blocks"], norm_num_groups=backbone["norm_num_groups"],
                       num_head_channels=backbone["num_head_channels"], noise_embed_scale=net.noise_embed_scale,
                       sigma_min=net.sigma_min, sigma_data=net.sigma_data)
    classes = 2 if net.mask_channels == 1 else net.mask_channels
    edm = build_network(mcfg, meta["image_channels"], classes)
    edm.load_state_dict(net.state_dict(), strict=True)
    save_model(edm, {"mode": "bundle", "bundle": model.resolve().name, "image_channels": edm.image_channels,
                     "mask_channels": edm.mask_channels, "num_classes": classes, "dataset": model.resolve().name,
                     "model": dump_config(mcfg), "preprocess": meta["preprocess"]}, out)
    return out


# --------------------------------------------------------------------------------------------- the run
@dataclass
class AdaptResult:
    folder: Path
    model: Path
    decision: str
    reason: str
    report: Path
    run_id: str | None


def _finetune_cfg(cfg: AdaptConfig, start: Path, meta: dict, recipe: dict, ids: list[str], exclude: list[str],
                  folder: Path, run_name: str, parent: str | None) -> FinetuneConfig:
    data = deep_merge(deep_merge(cfg.finetune, recipe), {
        "dataset": cfg.data.model_dump(), "init": str(start), "method": f"adapt-{run_name}", "budget": None, "ids": ids,
        "seed": cfg.seed, "preprocess": meta["preprocess"], "model": meta["model"], "output_dir": str(folder),
        "unlabelled_exclude": sorted(set(exclude)), "unlabelled_images": cfg.unlabelled_images, "parent_run_id": parent,
        "tags": {"adapt": str(cfg.output_dir)},
        "mlflow": deep_merge(dump_config(cfg.mlflow), {"run_name": run_name})})
    data.setdefault("train", {})
    data["train"] = {**data["train"], "check_data": False, "progress": False}
    return validate(FinetuneConfig, data, source=f"adapt {run_name}")


def _scores(net, cfg: AdaptConfig, preprocess: Preprocess, pairs: list[dict]) -> dict[str, float]:
    ev = evaluate(net, cfg.data, preprocess, "dev", pairs=pairs, n_overlays=0)
    return {r["id"]: float(r["dice"]) for r in ev.rows}


def _fold_mean(scores: Mapping[str, float], fold: Sequence[str]) -> float:
    vals = [scores[i] for i in fold if i in scores and not math.isnan(scores[i])]
    return float(np.mean(vals)) if vals else math.nan


def run_adaptation(cfg: AdaptConfig) -> AdaptResult:
    """Adapt (or resume, or return the finished adaptation of) ``cfg``; see the module docstring."""
    out = Path(cfg.output_dir)
    work = out / "work"
    start = starting_model(cfg.model, work, cfg.weights)
    with runs.Run.claim(out, _identity(cfg, start), cfg.mlflow) as run:
        if run.finished:
            st = run.state
            return AdaptResult(out, out / "model.pt", st["decision"], st["reason"], out / "report.md", st.get("mlflow_run_id"))
        net, meta = load_model(start)
        if meta["image_channels"] != cfg.data.channels:
            raise DataError(cfg.model, f"takes {meta['image_channels']}-channel images, the data has {cfg.data.channels}")
        preprocess = Preprocess(**meta["preprocess"])
        pool = {p["id"]: p for p in load_pairs(cfg.data, "pool")}
        ids = list(cfg.labelled) if cfg.labelled is not None else sorted(pool)
        missing = [i for i in ids if i not in pool]
        if missing:
            raise DataError(cfg.data.root, f"labelled ids {missing[:5]} are not in the data")
        rule = cfg.rule
        if len(ids) == 1 and rule.single_label_recipe not in cfg.recipes and (
                rule.single_label_wise > 0 or rule.single_label_check is not None):
            raise ValueError(f"one label: rule.single_label_recipe {rule.single_label_recipe!r}, what one label trains, is "
                             f"not one of recipes {sorted(cfg.recipes)}: add it, or name one of them")
        label_sha = {i: sha256(pool[i]["image"]) for i in ids}
        _refuse_a_start_trained_on(cfg, start, meta, label_sha)
        if cfg.check_data:
            require_valid(cfg.data.model_copy(update={"required_splits": ("pool",)}), splits=["pool"])
            require_readable_images(cfg.unlabelled_images, "unlabelled image")
        has_unlabelled = bool(cfg.unlabelled_images) or (cfg.unlabelled_pool and len(pool) > len(ids))
        recipes = {k: v for k, v in cfg.recipes.items() if has_unlabelled or not (v.get("semi") or {}).get("algorithm")}
        run_id = run.start(cfg, cfg.mlflow.run_name or f"adapt-{out.resolve().name}", params=dump_config(cfg),
                           tags={"medhybrid.stage": "adapt", "labels": str(len(ids)), **cfg.tags},
                           parent_run_id=cfg.parent_run_id)
        k = len(ids)
        write_json(out / "subset.json", {"budget": k, "seed": cfg.seed, "ids": ids}, indent=1)
        log.info("adapt: %d labelled image(s), %d unlabelled, start %s; candidates: start, %s x WiSE %s", k,
                 len(cfg.unlabelled_images) + (len(pool) - k if cfg.unlabelled_pool else 0), cfg.model,
                 ", ".join(recipes), ", ".join(f"{a:g}" for a in cfg.wise))
        start_sd = {n: v.detach().clone() for n, v in net.state_dict().items()}
        start_scores = _scores(net, cfg, preprocess, [pool[i] for i in ids])
        log.info("adapt: the start scores %.4f mean Dice on the %d labelled image(s)", np.nanmean(list(start_scores.values())), k)
        never = [i for i in pool if i not in ids] if not cfg.unlabelled_pool else []
        exclude = sorted(set(cfg.unlabelled_exclude) | set(never))

        trained: dict[str, list[float]] = {}
        folds: list[list[str]] = []
        share = None
        if k >= 2:
            folds = fold_split(ids, cfg.max_loo, cfg.folds, cfg.seed)
            tasks = [(f, r) for f in range(len(folds)) for r in recipes]
            bar = tqdm(tasks, desc="adapt", unit="fine-tune", disable=not (cfg.progress and sys.stderr.isatty()))
            per: dict[str, dict[int, float]] = {}
            for f, r in bar:
                held = folds[f]
                train_ids = [i for i in ids if i not in held]
                fcfg = _finetune_cfg(cfg, start, meta, recipes[r], train_ids, exclude + held, work / "folds" / r / f"f{f}",
                                     f"{r}-fold{f}", run_id)
                res = run_finetuning(fcfg)
                ft, _ = load_model(res.checkpoint)
                ft_sd = ft.state_dict()
                shown = []
                for a in cfg.wise:
                    net.load_state_dict(interpolate_weights(start_sd, ft_sd, a))
                    s = _fold_mean(_scores(net, cfg, preprocess, [pool[i] for i in held]), held)
                    per.setdefault(_name(r, a), {})[f] = s
                    shown.append(f"{a:g}: {s:.3f}")
                log.info("adapt: fold %d/%d, %s (held out %s): held-out Dice %s; start %.3f", f + 1, len(folds), r,
                         ", ".join(held), ", ".join(shown), _fold_mean(start_scores, held))
            net.load_state_dict(start_sd)
            trained = {n: [v[f] for f in range(len(folds))] for n, v in per.items()}
            start_folds = [_fold_mean(start_scores, fold) for fold in folds]
            decision = decide(start_folds, trained, cfg.rule, cfg.seed)
            if cfg.rule.checks_labels(k):  # computed for the report even when the held-out rule keeps the start
                share = start_confident_errors(net, cfg.data, preprocess, [pool[i] for i in ids], cfg.rule.sure)
                decision = labels_check(cfg.rule, share, decision, k)
            choice = decision.choice
        else:
            share = start_confident_errors(net, cfg.data, preprocess, [pool[ids[0]]], cfg.rule.sure)
            decision = single_label_decision(cfg.rule, share, [Candidate(KEEP, None, None, [start_scores[ids[0]]]).summary()])
            choice = decision.choice
        log.info("adapt: decision: %s (%s)", decision.choice, decision.reason)

        recipe_name, alpha = parse_choice(choice)
        final_meta = dict(meta)
        if recipe_name is None:
            final = net
        else:
            recipe = cfg.recipes.get(recipe_name, {})
            fcfg = _finetune_cfg(cfg, start, meta, recipe, ids, exclude, work / "final" / recipe_name, f"{recipe_name}-all", run_id)
            res = run_finetuning(fcfg)
            final, final_meta = load_model(res.checkpoint)
            final.load_state_dict(interpolate_weights(start_sd, final.state_dict(), alpha))
            final_meta = dict(final_meta)
        final_meta["adapt"] = {"decision": choice, "recipe": recipe_name, "wise": alpha, "labels": k,
                               "start": str(Path(cfg.model).resolve()), "start_sha256": sha256(_start_weights(cfg, start)),
                               "reason": decision.reason,
                               **({"confident_error_share": share} if share is not None else {}),
                               # the images these weights were trained on (none when the start is kept as it is)
                               "labels_sha256": sorted(label_sha.values()) if recipe_name is not None else []}
        if recipe_name is not None and alpha < 1:
            final_meta["wise"] = alpha
        save_model(final, final_meta, out / "model.pt")
        per_fold = {KEEP: [_fold_mean(start_scores, fold) for fold in folds], **trained}
        report = _write_report(cfg, out, k, start_scores, folds, per_fold, decision, recipes, share)
        if run_id:
            best = {f"heldout_dice_{c['name']}": c["dice"] for c in decision.candidates if not math.isnan(c["dice"])}
            checked = {"confident_error_share": share} if share is not None and not math.isnan(share) else {}
            tracking.log_metrics(cfg.mlflow, run_id, {"labels": k, "switched": float(choice != KEEP), **checked, **best},
                                 step=0)
        run.finish([out / "config.yaml", out / "subset.json", report, out / "report.json"], decision=choice,
                   reason=decision.reason, ids=ids)
        return AdaptResult(out, out / "model.pt", choice, decision.reason, report, run_id)


def _identity(cfg: AdaptConfig, start: Path) -> str:
    """The adaptation's identity: its settings, the starting weights' content, the content of every pool image and mask
    (the labels it may be given; a target's test split is not even looked at) and the path and size of every other
    unlabelled image, so a folder adapted to other labels or another start is never taken as done. Modification times
    are left out: a copied or restored data folder is the same data, and its runs resume."""
    pool = [q for p in load_pairs(cfg.data, "pool") for q in (p["image"], p.get("label")) if q]
    d = {k: v for k, v in dump_config(cfg).items() if k not in ("mlflow", "output_dir", "progress", "check_data")}
    d.update(start_sha256=sha256(_start_weights(cfg, start)), pool=[(Path(f).name, sha256(f)) for f in pool if Path(f).exists()],
             unlabelled=[(f, Path(f).stat().st_size) for f in cfg.unlabelled_images if Path(f).exists()])
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _start_weights(cfg: AdaptConfig, start: Path) -> Path:
    """The file the starting weights come from: ``cfg.weights``, a bundle's ``models/model.pt``, or the model.pt."""
    return Path(cfg.weights or (Path(cfg.model) / "models" / "model.pt" if Path(cfg.model).is_dir() else start))


def _refuse_a_start_trained_on(cfg: AdaptConfig, start: Path, meta: Mapping, label_sha: Mapping[str, str]) -> None:
    """Raise :class:`DataError` when an earlier adaptation trained the starting weights on some of these labelled
    images (by content, from the model's ``meta["adapt"]`` or a bundle weights file's note): scored on them, the start
    would be checked on images it learnt, and every fold would start from weights that saw its held-out image."""
    src = _start_weights(cfg, start)
    info = meta.get("adapt") or weights_note(src) or {}
    seen = set(info.get("labels_sha256") or ())
    both = [i for i, h in label_sha.items() if h in seen]
    if both:
        raise DataError(src, f"was adapted on {len(both)} of these {len(label_sha)} labelled images ({', '.join(both[:5])}"
                        f"{', ...' if len(both) > 5 else ''}): checked on them, it would be scored on images it trained "
                        f"on. Adapt the weights it started from ({info.get('base') or info.get('start') or 'unknown'}) "
                        "with all your labels instead")


def _name(recipe: str, alpha: float) -> str:
    return recipe if alpha == 1 else f"{recipe}-wise{alpha:g}"


def parse_choice(choice: str) -> tuple[str | None, float]:
    """``(recipe, WiSE-FT weight)`` of a decision: ``(None, 0)`` for the start, ``("plain", 0.5)`` for
    ``plain-wise0.5``, ``("fixmatch", 1.0)`` for ``fixmatch``."""
    if choice == KEEP:
        return None, 0.0
    recipe, _, a = choice.partition("-wise")
    return recipe, float(a) if a else 1.0


def _write_report(cfg: AdaptConfig, out: Path, k: int, start_scores: Mapping[str, float], folds: list[list[str]],
                  per_fold: Mapping[str, list[float]], decision: Decision, recipes: Mapping[str, dict],
                  share: float | None = None) -> Path:
    """``report.md`` and ``report.json``: each candidate's held-out Dice with its interval, the decision, its reason
    (with one label, or up to ``rule.label_check_up_to``, the share of the start's wrong pixels on the labels that it
    is sure of, ``share``)."""
    write_json(out / "report.json", {"labels": k, "folds": folds, "start_per_image": dict(start_scores),
                                      **({"confident_error_share": share} if share is not None else {}),
                                      "decision": decision.choice, "reason": decision.reason,
                                      "rule": dump_config(cfg.rule), "candidates": decision.candidates, "per_fold": dict(per_fold),
                                      "recipes": {n: recipes[n] for n in recipes}}, allow_nan=True)

    def f(x, fmt="{:.3f}"):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    lines = [f"# Adaptation of `{Path(cfg.model).name}` to {k} labelled image(s)", "",
             f"**Decision: {decision.choice}.** {decision.reason[0].upper() + decision.reason[1:]}.", ""]
    if folds:
        lines += [f"Held-out check: {'leave-one-out' if all(len(x) == 1 for x in folds) else f'{len(folds)}-fold'} over "
                  f"the {k} labelled images; each candidate's Dice on the images its fold held out (95 % bootstrap "
                  "interval over folds), and its paired gain over the start.", "",
                  "| candidate | held-out Dice | interval | gain over start | interval | folds with a gain |",
                  "|---|---|---|---|---|---|"]
        for c in sorted(decision.candidates, key=lambda c: -c["dice"]):
            lo, hi = f(c.get("dice_low")), f(c.get("dice_high"))
            glo, ghi = (f(c.get("gain_low"), "{:+.3f}"), f(c.get("gain_high"), "{:+.3f}")) if c["name"] != KEEP else ("", "")
            mark = "**" if c["name"] == decision.choice else ""
            lines.append(f"| {mark}{c['name']}{mark} | {f(c['dice'])} | {f'[{lo}, {hi}]' if lo else ''} | "
                         f"{f(c.get('gain'), '{:+.3f}') if c['name'] != KEEP else ''} | {f'[{glo}, {ghi}]' if glo else ''} | "
                         f"{f(c.get('positive_share'), '{:.0%}') if c['name'] != KEEP else ''} |")
        lines += ["", f"Rule (fixed in advance): switch to the best candidate only when its mean held-out gain is at least "
                  f"{cfg.rule.min_gain:.3f} Dice and positive in at least {cfg.rule.min_share:.0%} of the folds."]
        if share is not None:
            lines += ["", f"Up to {cfg.rule.label_check_up_to} labels the labels also check the start: on them, "
                      f"{_share_seen(share)} (foreground probability beyond {cfg.rule.sure:g} or below "
                      f"{1 - cfg.rule.sure:g}); a switch needs at least {cfg.rule.single_label_check:.0%}."]
    else:
        lines += [f"The start scores {f(next(iter(start_scores.values())))} Dice on the one label (it never saw it)."]
        if share is not None:
            lines += ["", f"On it, {_share_seen(share)} (foreground probability beyond {cfg.rule.sure:g} or below "
                      f"{1 - cfg.rule.sure:g}); the rule switches at "
                      + (f"{cfg.rule.single_label_check:.0%}." if cfg.rule.single_label_check is not None else
                         "no share (single_label_check off).")]
    lines += ["", "Starting model's Dice on each labelled image:", "", "| image | Dice |", "|---|---|"]
    lines += [f"| {i} | {f(v)} |" for i, v in sorted(start_scores.items())]
    path = out / "report.md"
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


__all__ = ["AdaptConfig", "AdaptResult", "AdaptRule", "Decision", "KEEP", "confident_error_share", "decide", "fold_split",
           "folder_dataset", "foreground_probability", "labels_check", "pairs_dataset", "single_label_decision", "start_confident_errors",
           "parse_choice", "run_adaptation", "starting_channels", "starting_model"]
