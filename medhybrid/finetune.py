"""Few-shot fine-tuning on the target domain.

Any pretrained ``model.pt`` (or random init, for the scratch baseline) is fine-tuned on ``budget``
labelled images drawn from the target's ``pool`` (nested subsets per seed) with the mask loss, the
network fed the clean image at sigma_min. There is no validation set in a few-label setting: the
schedule is fixed by the config, and the target's ``test`` split is only read by :mod:`medhybrid.evaluate`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from ignite.engine import Events
from monai.data import CacheDataset
from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd
from pydantic import Field

from medhybrid import runs, tracking
from medhybrid.batches import SegmentationPrepareBatch
from medhybrid.check import require_valid
from medhybrid.checkpoints import network_meta, read_model_file, save_model, transfer_weights
from medhybrid.config import Preprocess, StrictModel, dump_config
from medhybrid.datasets import few_shot_pairs
from medhybrid.engines import TrainConfig, fit
from medhybrid.fewshot import FewShotRunConfig, claim_few_shot_run, open_few_shot_run, require_channels
from medhybrid.losses import FinetuneLoss
from medhybrid.networks import EDMPrecond, ModelConfig, build_network
from medhybrid.transforms import preprocessing

log = logging.getLogger("medhybrid")


class AugmentConfig(StrictModel):
    """Random augmentation of the few labelled images (MONAI dictionary transforms)."""

    enabled: bool = True
    flip: bool = True
    rotate_degrees: float = Field(15.0, ge=0)
    scale: float = Field(0.1, ge=0, description="random zoom range +-scale")
    intensity: float = Field(0.1, ge=0, description="random intensity scale/shift range")


class FinetuneSchedule(StrictModel):
    """Iterations = clamp(per_label * budget, min_iterations, max_iterations), split into epochs."""

    per_label: int = Field(20, ge=1)
    min_iterations: int = Field(100, ge=1)
    max_iterations: int = Field(400, ge=1)
    epochs: int = Field(4, ge=1)

    def iterations(self, budget: int) -> int:
        return max(self.min_iterations, min(self.max_iterations, self.per_label * budget))


class FinetuneConfig(FewShotRunConfig):
    init: Path | None = Field(None, description="pretrained model.pt; None = random init (from scratch)")
    preprocess: Preprocess = Field(default_factory=Preprocess)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(batch_size=8, lr=1e-4, warmup_iterations=20,
                                                                  val_max_images=None, grad_clip=1.0))
    schedule: FinetuneSchedule = Field(default_factory=FinetuneSchedule)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


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


def augmentation(cfg: AugmentConfig):
    if not cfg.enabled:
        return None
    t = []
    if cfg.flip:
        t += [RandFlipd(["image", "label"], prob=0.5, spatial_axis=0), RandFlipd(["image", "label"], prob=0.5, spatial_axis=1)]
    if cfg.rotate_degrees or cfg.scale:
        r = cfg.rotate_degrees * 3.14159265 / 180
        t.append(RandAffined(["image", "label"], prob=0.8, rotate_range=(r,), scale_range=(cfg.scale, cfg.scale),
                             mode=("bilinear", "nearest"), padding_mode="border"))
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


def reseeded_each_epoch(aug: Compose | None, seed: int):
    """An ``on_trainer`` hook: ``aug``'s random state set from (``seed``, epoch) as each epoch starts, so a resumed
    fine-tune draws the same augmentations as an uninterrupted one."""

    def attach(engine) -> None:
        if aug is not None:
            engine.add_event_handler(Events.EPOCH_STARTED, lambda e: aug.set_random_state(seed=seed * 1000 + e.state.epoch))

    return attach


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
    h, done = claim_few_shot_run(cfg)
    if done is not None:
        return FinetuneResult(folder, model_path, done.get("mlflow_run_id"), done.get("ids", []), done.get("transfer", {}))

    pairs = few_shot_pairs(cfg.dataset, cfg.budget, cfg.seed, ids=cfg.ids)  # pool only; raises on a budget larger than the pool
    if cfg.train.check_data:
        require_valid(cfg.dataset, splits=["pool"])
    ids = [p["id"] for p in pairs]
    budget = len(pairs)
    iterations = cfg.schedule.iterations(budget)
    epochs = min(cfg.schedule.epochs, iterations)
    train_cfg = cfg.train.model_copy(update={"epochs": epochs, "epoch_length": max(1, iterations // epochs),
                                             "batch_size": min(cfg.train.batch_size, max(2, budget)), "seed": cfg.seed})
    run_id = open_few_shot_run(cfg, h, ids)
    with runs.failing_marks(cfg.mlflow, folder, run_id):
        net, transfer = initial_network(cfg)
        runs.write_state(folder, transfer={"loaded": len(transfer["loaded"]), "skipped": sorted(transfer["skipped"]),
                                           "missing": transfer["missing"]})
        ds, aug = training_dataset(cfg, pairs)
        prepare = SegmentationPrepareBatch()  # the clean image, fed at sigma_min
        loss = FinetuneLoss(net.image_channels, net.mask_channels)

        mlflow = functools.partial(tracking.engine_handler, cfg.mlflow, run_id) if run_id else None
        result = fit(net, ds, prepare, loss, train_cfg, folder, mlflow_handler_factory=mlflow,
                     checkpoint_prefix="finetune", on_trainer=reseeded_each_epoch(aug, cfg.seed))
        meta = network_meta(result.network, ModelConfig(**_model_cfg(cfg)), cfg.preprocess, cfg.dataset, "finetune")
        meta.update(method=cfg.method, budget=budget, seed=cfg.seed)
        save_model(result.network, meta, model_path)
    runs.close_run(cfg.mlflow, folder, run_id, [folder / "config.yaml", folder / "subset.json"])
    return FinetuneResult(folder, model_path, run_id, ids, transfer)


def _model_cfg(cfg: FinetuneConfig) -> dict:
    if cfg.init is None:
        return dump_config(cfg.model)
    return read_model_file(cfg.init)["meta"]["model"]
