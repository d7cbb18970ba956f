"""Few-shot fine-tuning on the target domain.

Any pretrained ``model.pt`` (or random init, for the scratch baseline) is fine-tuned on ``budget``
labelled images drawn from the target's ``pool`` (nested subsets per seed) with the mask loss, the
network fed the clean image at sigma_min. There is no validation set in a few-label setting: the
schedule is fixed by the config, and the target's ``test`` split is only read by :mod:`medhybrid.workflows.evaluate`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from ignite.engine import Events
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd
from pydantic import Field, field_validator, model_validator

from medhybrid.core import runs, tracking
from medhybrid.core.config import StrictModel, dump_config
from medhybrid.data.check import require_valid
from medhybrid.data.datasets import few_shot_pairs, load_pairs
from medhybrid.data.specs import Preprocess
from medhybrid.data.transforms import preprocessing
from medhybrid.data.unlabelled import MixedDataset, batch_split
from medhybrid.engines import robust as R
from medhybrid.engines import semi as S
from medhybrid.engines.batches import MixedBatchSampler, SegmentationPrepareBatch
from medhybrid.engines.fit import TrainConfig, fit
from medhybrid.engines.losses import FinetuneLoss
from medhybrid.networks import diffusion as D
from medhybrid.networks.checkpoints import interpolate_weights, model_meta, network_meta, read_model_file, save_model, transfer_weights
from medhybrid.networks.nets import EDMPrecond, ModelConfig, build_network
from medhybrid.workflows.fewshot import FewShotRunConfig, claim_few_shot_run, open_few_shot_run, require_channels

log = logging.getLogger("medhybrid")


class AugmentConfig(StrictModel):
    """Random augmentation of the few labelled images (MONAI dictionary transforms)."""

    enabled: bool = True
    flip: bool = True
    rotate_degrees: float = Field(15.0, ge=0)
    scale: float = Field(0.1, ge=0, description="random zoom range +-scale")
    intensity: float = Field(0.1, ge=0, description="random intensity scale/shift range")


@dataclass(frozen=True)
class Recipe:
    """The one few-shot fine-tuning recipe: ``medhybrid finetune``'s defaults, the ablation profiles' fine-tunes, the
    fold fine-tunes of ``medhybrid adapt`` and the bundles' ``train.json`` (which read these numbers from here) all
    train with it. Iterations = clamp(per_label x labels, min_iterations, max_iterations): 60 at 1-6 labels, 100 from
    10, in batches of up to 8 labelled images at AdamW lr 2e-4 after a 10-iteration warm-up."""

    lr: float = 2e-4
    warmup_iterations: int = 10
    batch_size: int = 8
    per_label: int = 10
    min_iterations: int = 60
    max_iterations: int = 100
    epochs: int = 2


RECIPE = Recipe()
RECIPE_TRAIN = {"batch_size": RECIPE.batch_size, "lr": RECIPE.lr, "warmup_iterations": RECIPE.warmup_iterations}
"""The recipe's :class:`~medhybrid.engines.fit.TrainConfig` fields, under whatever a config gives."""


class FinetuneSchedule(StrictModel):
    """Iterations = clamp(per_label * budget, min_iterations, max_iterations), split into epochs."""

    per_label: int = Field(RECIPE.per_label, ge=1)
    min_iterations: int = Field(RECIPE.min_iterations, ge=1)
    max_iterations: int = Field(RECIPE.max_iterations, ge=1)
    epochs: int = Field(RECIPE.epochs, ge=1)

    def iterations(self, budget: int) -> int:
        return max(self.min_iterations, min(self.max_iterations, self.per_label * budget))


class FinetuneConfig(FewShotRunConfig):
    init: Path | None = Field(None, description="pretrained model.pt; None = random init (from scratch)")
    preprocess: Preprocess = Field(default_factory=Preprocess)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**RECIPE_TRAIN, val_max_images=None), description="the optimisation; "
                               "fields not given keep the recipe's (RECIPE), not TrainConfig's pretraining defaults")
    schedule: FinetuneSchedule = Field(default_factory=FinetuneSchedule)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    semi: S.SemiConfig = Field(default_factory=S.SemiConfig, description="semi-supervised fine-tuning: the pool's "
                               "other images, without their masks, in every batch (medhybrid.engines.semi)")
    unlabelled_exclude: list[str] = Field(default_factory=list, exclude_if=lambda v: not v,
                                          description="pool ids never used as unlabelled images (a development set)")
    unlabelled_images: list[str] = Field(default_factory=list, exclude_if=lambda v: not v,
                                         description="image files without masks, used as unlabelled images beside the "
                                         "pool's (semi-supervised fine-tuning; medhybrid adapt passes a user's)")
    wise: float = Field(1.0, ge=0.0, le=1.0, exclude_if=lambda v: v == 1.0,
                        description="robust fine-tuning (WiSE-FT, Wortsman et al. 2022): the saved weights are "
                        "(1 - wise) x pretrained + wise x fine-tuned; 1 = the fine-tuned weights alone (the default), "
                        "0 = the pretrained network unchanged. Needs init")
    robust: R.RobustConfig = Field(default_factory=R.RobustConfig, exclude_if=lambda v: v == R.RobustConfig(),
                                   description="robust fine-tuning (medhybrid.engines.robust), each option off by default: "
                                   "L2-SP (Li et al. 2018), partial fine-tuning by parameter names (Lee et al. 2023), "
                                   "source rehearsal")

    @field_validator("train", mode="before")
    @classmethod
    def _recipe_under_train(cls, v):
        return {**RECIPE_TRAIN, **v} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _wise_needs_init(self):
        if self.wise < 1.0 and self.init is None:
            raise ValueError(f"wise={self.wise} interpolates towards the pretrained weights: it needs init (a model.pt)")
        return self

    @model_validator(mode="after")
    def _robust_options(self):
        r = self.robust
        if r.l2sp_alpha > 0 and self.init is None:
            raise ValueError(f"robust.l2sp_alpha={r.l2sp_alpha} pulls the weights towards the pretrained ones: it needs "
                             "init (a model.pt)")
        if r.rehearsal.enabled:
            if self.semi.enabled:
                raise ValueError(f"robust.rehearsal and semi.algorithm={self.semi.algorithm} cannot be combined: both "
                                 "share out each batch (source rows, unlabelled rows); use one of them")
            src, n = r.rehearsal.dataset, self.dataset.mask.num_classes
            if src.mask.num_classes != n:
                raise ValueError(f"robust.rehearsal: source {src.name!r} has {src.mask.num_classes} classes, target "
                                 f"{self.dataset.name!r} {n}: their masks cannot share one loss")
        return self


def initial_network(cfg: FinetuneConfig) -> tuple[EDMPrecond, dict]:
    """The network to fine-tune: the pretrained architecture with its weights, or a fresh one."""
    torch.manual_seed(cfg.seed)
    nc = cfg.dataset.mask.num_classes
    if cfg.init is None:
        return build_network(cfg.model, cfg.dataset.channels, nc), {"loaded": [], "skipped": {}, "missing": []}
    ckpt = read_model_file(cfg.init)
    meta = ckpt["meta"]
    require_channels(meta, cfg)
    pre = meta.get("preprocess", {})
    if pre and pre.get("resolution") != cfg.preprocess.resolution:
        log.warning("%s was pretrained at %s px, fine-tuning at %s px", cfg.init, pre.get("resolution"), cfg.preprocess.resolution)
    net = build_network(ModelConfig(**meta["model"]), cfg.dataset.channels, nc)
    report = transfer_weights(net, ckpt["state_dict"], str(cfg.init))
    return net, report


def augmentation(cfg: AugmentConfig, with_label: bool = True):
    """The random augmentation of fine-tuning's images (and their labels): flips, a small affine, intensity jitter;
    None when disabled. Without label it is the weak augmentation of unlabelled images (:mod:`medhybrid.engines.semi`)."""
    if not cfg.enabled:
        return None
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else "bilinear"
    t = []
    if cfg.flip:
        t += [RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1)]
    if cfg.rotate_degrees or cfg.scale:
        r = cfg.rotate_degrees * 3.14159265 / 180
        t.append(RandAffined(keys, prob=0.8, rotate_range=(r,), scale_range=(cfg.scale, cfg.scale),
                             mode=modes, padding_mode="border"))
    if cfg.intensity:
        t += [RandScaleIntensityd("image", factors=cfg.intensity, prob=0.5),
              RandShiftIntensityd("image", offsets=cfg.intensity, prob=0.5)]
    return Compose(t)


def training_dataset(cfg: FinetuneConfig, pairs: list[dict]) -> tuple[CacheDataset, Compose | None]:
    """The labelled pairs as MONAI's ``CacheDataset``: each pair's deterministic preprocessing is cached, the random
    augmentation (returned too, to be reseeded by :func:`reseeded_each_epoch`) runs on a copy at every draw."""
    aug = augmentation(cfg.augment)
    pre = preprocessing(cfg.dataset, cfg.preprocess)
    transform = Compose([*pre.transforms, *aug.transforms]) if aug is not None else pre
    return CacheDataset(pairs, transform=transform, progress=False, copy_cache=True), aug


def reseeded_each_epoch(aug: Compose | list[Compose] | None, seed: int):
    """An ``on_trainer`` hook: each of ``aug``'s random states set from (``seed``, epoch, its position) as each epoch
    starts, so a resumed fine-tune draws the same augmentations as an uninterrupted one."""
    augs = [] if aug is None else [aug] if isinstance(aug, Compose) else list(aug)

    def attach(engine) -> None:
        for i, a in enumerate(augs):
            engine.add_event_handler(Events.EPOCH_STARTED,
                                     lambda e, a=a, i=i: a.set_random_state(seed=seed * 1000 + e.state.epoch + 7919 * i))

    return attach


def unlabelled_items(cfg: FinetuneConfig, labelled_ids: list[str]) -> list[dict]:
    """The semi-supervised run's unlabelled images: the pool's images outside the labelled subset and
    ``cfg.unlabelled_exclude`` (sorted by id), then ``cfg.unlabelled_images``; the first ``semi.max_unlabelled``, as
    ``{"image", "id"}`` without their masks. Only the pool is read: the target's ``test`` split never enters, with or
    without masks."""
    skip = set(labelled_ids) | set(cfg.unlabelled_exclude)
    pool = sorted((p for p in load_pairs(cfg.dataset, "pool") if p["id"] not in skip), key=lambda p: p["id"])
    items = [{"image": p["image"], "id": p["id"]} for p in pool]
    items += [{"image": str(f), "id": f"unlabelled/{Path(f).name}"} for f in cfg.unlabelled_images]
    return items[: cfg.semi.max_unlabelled or None]


def semi_training(cfg: FinetuneConfig, net: EDMPrecond, pairs: list[dict], unlabelled: list[dict], train_cfg: TrainConfig):
    """The semi-supervised seams: ``(dataset, sampler, prepare_batch, loss, augmentations, train_cfg)``; the dataset
    holds the labelled pairs then the unlabelled images (each weakly augmented, and given a strong view for
    FixMatch), every batch ``k_l`` of the first and ``k_u`` of the second."""
    semi = cfg.semi
    labelled_ds, aug = training_dataset(cfg, pairs)
    weak = augmentation(cfg.augment, with_label=False)
    tail = [*(weak.transforms if weak is not None else []), *semi.strong_transforms(cfg.preprocess.resolution)]
    u_aug = Compose(tail) if tail else None
    pre = preprocessing(cfg.dataset, cfg.preprocess, with_label=False)
    u_ds = CacheDataset(unlabelled, transform=Compose([*pre.transforms, *tail]), progress=False, copy_cache=True)
    ds = MixedDataset(labelled_ds, u_ds, views=semi.views)
    kl, ku = semi.per_batch(train_cfg.batch_size)
    train_cfg = train_cfg.model_copy(update={"batch_size": kl + ku})
    sampler = MixedBatchSampler(len(pairs), len(unlabelled), (kl, ku), train_cfg.epoch_length, seed=cfg.seed)
    edm = D.EDMParams(sigma_min=net.sigma_min, sigma_data=net.sigma_data)  # the network's own constants
    prepare, loss = S.prepare_and_loss(semi, train_cfg.iterations, net.image_channels, net.mask_channels, cfg.seed, edm)
    return ds, sampler, prepare, loss, [a for a in (aug, u_aug) if a is not None], train_cfg


def rehearsal_training(cfg: FinetuneConfig, pairs: list[dict], train_cfg: TrainConfig):
    """Source rehearsal's seams: ``(dataset, sampler, augmentations)``; the dataset holds the labelled target pairs then
    the source's labelled images (``robust.rehearsal``: its splits only, read as the target's images are, converted to
    the target's channels, with the same augmentation), every batch ``k_t`` of the first and ``k_s`` of the second
    (:class:`~medhybrid.engines.batches.MixedBatchSampler`), all with their masks: the mask loss covers both. The source
    images are decoded as they are drawn (a fine-tune draws far fewer than a source holds)."""
    reh = cfg.robust.rehearsal
    target_ds, aug = training_dataset(cfg, pairs)
    source = reh.dataset.model_copy(update={"channels": cfg.dataset.channels})
    src_pairs = sorted(load_pairs(source, reh.splits), key=lambda p: p["id"])
    if not src_pairs:
        raise ValueError(f"rehearsal source {source.name!r} has no images in split(s) {reh.splits}")
    kt, ks = batch_split(train_cfg.batch_size, reh.share)
    if not kt or not ks:
        raise ValueError(f"rehearsal needs batches of at least 2 rows (one target, one source), have {train_cfg.batch_size}")
    s_aug = augmentation(cfg.augment)
    pre = preprocessing(source, cfg.preprocess)
    src_ds = Dataset(src_pairs, transform=Compose([*pre.transforms, *s_aug.transforms]) if s_aug is not None else pre)
    sampler = MixedBatchSampler(len(pairs), len(src_pairs), (kt, ks), train_cfg.epoch_length, seed=cfg.seed)
    log.info("source rehearsal: %d target + %d %s rows in each batch of %d (%d source images)", kt, ks, source.name,
             kt + ks, len(src_pairs))
    return (torch.utils.data.ConcatDataset([target_ds, src_ds]), sampler,
            [a for a in (aug, s_aug) if a is not None])


@dataclass
class FinetuneResult:
    folder: Path
    checkpoint: Path
    run_id: str | None
    ids: list[str]
    transfer: dict


def run_finetuning(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune (or resume, or return the finished run of) ``cfg``. Writes ``model.pt``,
    ``config.yaml``, ``subset.json`` (the ids used) and one MLflow run."""
    folder, model_path = cfg.folder, cfg.folder / "model.pt"
    with claim_few_shot_run(cfg) as run:
        if run.finished:
            done = run.state
            return FinetuneResult(folder, model_path, done.get("mlflow_run_id"), done.get("ids", []), done.get("transfer", {}))

        pairs = few_shot_pairs(cfg.dataset, cfg.budget, cfg.seed, ids=cfg.ids)  # pool only; raises on a budget larger than the pool
        if cfg.train.check_data:
            require_valid(cfg.dataset, splits=["pool"])
            if cfg.robust.rehearsal.enabled:
                require_valid(cfg.robust.rehearsal.dataset, splits=cfg.robust.rehearsal.splits)
        ids = [p["id"] for p in pairs]
        budget = len(pairs)
        iterations = cfg.schedule.iterations(budget)
        epochs = min(cfg.schedule.epochs, iterations)
        train_cfg = cfg.train.model_copy(update={"epochs": epochs, "epoch_length": max(1, iterations // epochs),
                                                 "batch_size": min(cfg.train.batch_size, max(2, budget)), "seed": cfg.seed})
        run_id = open_few_shot_run(cfg, run, ids)
        net, transfer = initial_network(cfg)
        start = {k: v.detach().clone() for k, v in net.state_dict().items()} if cfg.wise < 1.0 or cfg.robust.l2sp else None
        if cfg.robust.trainable is not None:
            _freeze(net, cfg.robust.trainable, transfer)
        runs.write_state(folder, transfer={"loaded": len(transfer["loaded"]), "skipped": sorted(transfer["skipped"]),
                                           "missing": transfer["missing"]})
        unlabelled = unlabelled_items(cfg, ids) if cfg.semi.enabled else []
        sampler = None
        if unlabelled:
            ds, sampler, prepare, loss, aug, train_cfg = semi_training(cfg, net, pairs, unlabelled, train_cfg)
            log.info("semi-supervised fine-tuning (%s): %d labelled, %d unlabelled pool images", cfg.semi.algorithm,
                     len(pairs), len(unlabelled))
        else:
            if cfg.semi.enabled:
                log.warning("%s: no unlabelled pool image left beside the %d labelled ones: plain fine-tuning",
                            cfg.semi.algorithm, len(pairs))
            if cfg.robust.rehearsal.enabled:
                ds, sampler, aug = rehearsal_training(cfg, pairs, train_cfg)
            else:
                ds, aug = training_dataset(cfg, pairs)
            prepare = SegmentationPrepareBatch()  # the clean image, fed at sigma_min
            loss = FinetuneLoss(net.image_channels, net.mask_channels)
        if cfg.robust.l2sp:  # Li et al. 2018, eq. 4: S = the tensors transferred from init
            loss = R.L2SPLoss(loss, net, {k: start[k] for k in transfer["loaded"] if k in start}, cfg.robust.l2sp_alpha,
                              cfg.robust.l2sp_beta)
        runs.write_state(folder, unlabelled=len(unlabelled))

        mlflow = functools.partial(tracking.engine_handler, cfg.mlflow, run_id) if run_id else None
        result = fit(net, ds, prepare, loss, train_cfg, folder, mlflow_handler_factory=mlflow, sampler=sampler,
                     checkpoint_prefix="finetune", on_trainer=reseeded_each_epoch(aug, cfg.seed))
        if cfg.wise < 1.0:
            _interpolate_towards_start(result.network, start, set(transfer["loaded"]), cfg)
        meta = network_meta(result.network, ModelConfig(**_model_cfg(cfg)), cfg.preprocess, cfg.dataset, "finetune")
        meta.update(method=cfg.method, budget=budget, seed=cfg.seed, **({"wise": cfg.wise} if cfg.wise < 1.0 else {}),
                    **({"robust": cfg.robust.meta()} if cfg.robust.enabled else {}))
        save_model(result.network, meta, model_path)
        run.finish([folder / "config.yaml", folder / "subset.json"])
        return FinetuneResult(folder, model_path, run_id, ids, transfer)


def _interpolate_towards_start(net: EDMPrecond, start: dict[str, torch.Tensor], loaded: set[str],
                               cfg: FinetuneConfig) -> None:
    """The fine-tuned ``net`` replaced in place by its WiSE-FT interpolation with ``start``, the weights it had before
    fine-tuning (transferred from ``cfg.init`` at the start of this run, also of a resumed one)."""
    ft = net.state_dict()
    pre = {k: v if k in loaded else ft[k] for k, v in start.items()}  # a re-initialised head: its fine-tuned values
    net.load_state_dict(interpolate_weights(pre, ft, cfg.wise))
    log.info("WiSE-FT: %d of %d tensors at %.2f x fine-tuned + %.2f x %s", len(loaded), len(ft), cfg.wise,
             1 - cfg.wise, cfg.init)


def _freeze(net: EDMPrecond, trainable: list[str], transfer: dict) -> None:
    """Partial fine-tuning (``robust.trainable``): every parameter it does not select frozen; a warning for a
    re-initialised tensor (not transferred from init) left frozen at its random start."""
    kept, loaded = set(R.freeze(net, trainable)), set(transfer["loaded"])
    new = sorted(k for k, _ in net.named_parameters() if k not in kept and k not in loaded)
    if new:
        log.warning("partial fine-tuning: %d frozen tensor(s) were not transferred from a pretrained model and stay at "
                    "their random initial values, e.g. %s", len(new), new[:3])


def _model_cfg(cfg: FinetuneConfig) -> dict:
    if cfg.init is None:
        return dump_config(cfg.model)
    return model_meta(cfg.init)["model"]


__all__ = ["RECIPE", "Recipe", "augmentation", "AugmentConfig", "FinetuneConfig", "FinetuneResult", "FinetuneSchedule",
           "initial_network", "rehearsal_training", "reseeded_each_epoch", "run_finetuning", "semi_training",
           "training_dataset", "unlabelled_items"]
