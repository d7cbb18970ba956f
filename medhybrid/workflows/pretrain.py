"""Pretraining on the source domain, in one of five modes on the same network and data pipeline:

- ``hybrid``: joint denoising + mask prediction from the noised image (Sauvalle & Salzmann 2024)
- ``supervised``: mask loss only, clean input at sigma_min
- ``diffusion``: EDM denoising only (labels unused)
- ``mdm``: masked diffusion (Pan et al. 2023): patches masked instead of noise, SSIM loss
- ``none``: random initialisation (the from-scratch baseline)

Beside the labelled source, ``unlabelled`` lists image-only sources (a PACS export, a clinic's archive, a target's
``pool`` without its masks) mixed into every batch at ``unlabelled.share`` (:mod:`medhybrid.data.unlabelled`): the
denoising and masked-patch objectives apply to them, the mask loss never does. ``diffusion`` and ``mdm`` can
pretrain from unlabelled images alone (``dataset: null``).

``run_pretraining(cfg)`` writes ``<output_dir>/model.pt`` (weights + metadata, loadable with
``weights_only=True``), checkpoints, the resolved config and previews, and records one MLflow run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ignite.distributed as idist
import torch
from monai.data import CacheDataset
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice
from monai.inferers import SimpleInferer
from pydantic import Field, field_validator, model_validator
from torch import nn

from medhybrid.core import runs, tracking
from medhybrid.core.config import StrictModel, dump_config
from medhybrid.core.runs import config_hash
from medhybrid.core.tracking import MLflowConfig
from medhybrid.data.check import require_valid
from medhybrid.data.datasets import load_pairs
from medhybrid.data.specs import DatasetRef, DatasetSpec, Preprocess
from medhybrid.data.transforms import preprocessing
from medhybrid.data.unlabelled import MixedDataset, UnlabelledConfig, check_sources, mixed_batch, unlabelled_dataset
from medhybrid.data.visualize import grid, overlay, save_png, to_uint8
from medhybrid.engines.batches import CorruptionPrepareBatch, LevelsPrepareBatch, MixedBatchSampler, SegmentationPrepareBatch
from medhybrid.engines.fit import TrainConfig, fit
from medhybrid.engines.losses import PretrainLoss
from medhybrid.engines.metrics import PerLevelMSE, dice_output_transform
from medhybrid.networks.checkpoints import network_meta, save_model
from medhybrid.networks.inferers import SegmentationInferer
from medhybrid.networks.modes import get_mode, levels_of, mode_names
from medhybrid.networks.nets import EDMPrecond, ModelConfig, build_network, mask_classes

log = logging.getLogger("medhybrid")

MODES = mode_names()
"""The registered pretraining modes (:mod:`medhybrid.networks.modes`)."""


class HybridConfig(StrictModel):
    """How the mask loss meets the noise levels in ``hybrid`` mode (see
    :class:`medhybrid.engines.batches.CorruptionPrepareBatch`)."""

    mask_weight: float = Field(1.0, ge=0, description="weight of the mask term against the EDM term")
    seg_fraction: float = Field(0.5, ge=0, le=1, description="share of each batch noised only in the low band")
    seg_sigma_max: float = Field(0.1, gt=0, description="top of the low-noise band where the mask loss applies")
    weighting: Literal["all", "low", "cskip"] = Field("cskip", description="per-sample mask-loss weight by sigma: "
                                                      "cskip = c_skip(sigma), the share of the clean signal in the input")


class MDMConfig(StrictModel):
    patch_size: int = Field(8, ge=1, description="side of the masked squares (Pan et al.: 8)")


class PretrainConfig(StrictModel):
    mode: str = Field("hybrid", description="a registered pretraining mode (medhybrid.networks.modes): hybrid, supervised, "
                      "diffusion, mdm or none")
    dataset: DatasetRef | None = Field(description="the labelled source domain (train/val splits); null: diffusion or "
                                       "mdm from the unlabelled images alone")
    unlabelled: UnlabelledConfig | None = Field(None, exclude_if=lambda v: v is None,
                                                description="image-only sources mixed into each batch (no mask loss)")
    num_classes: int | None = Field(None, ge=2, exclude_if=lambda v: v is None,
                                    description="mask classes of the network without a labelled dataset (None: 2, binary)")
    output_dir: Path | None = Field(None, description="None: runs/pretrain/<dataset>-<mode>")
    preprocess: Preprocess = Field(default_factory=Preprocess)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    mdm: MDMConfig = Field(default_factory=MDMConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    val_levels: tuple[float, ...] = Field((0.05, 0.2, 0.5, 1.0, 2.0), description="noise sigmas (MDM: mask ratios "
                                          "are derived) at which unlabelled modes report validation loss")

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        get_mode(v)
        return v

    @field_validator("dataset")
    @classmethod
    def _source(cls, v: DatasetSpec | None) -> DatasetSpec | None:
        if v is not None and v.role != "source":
            raise ValueError(f"dataset {v.name!r} is a {v.role} dataset; pretraining uses a source domain "
                             "(its train/val splits), never a target's pool or test (a target's pool images can join "
                             "without their masks: unlabelled.sources: [{dataset: NAME, splits: [pool]}])")
        if v is not None and not v.labelled:
            raise ValueError(f"dataset {v.name!r} has no masks: list it under unlabelled.sources instead")
        return v

    @model_validator(mode="after")
    def _data(self):
        if self.unlabelled is not None and not self.unlabelled.sources:
            self.unlabelled = None  # shared settings without sources (an ablation's common part): nothing to mix in
        can = [m for m in MODES if get_mode(m).reads_unlabelled]
        if self.unlabelled is not None and not get_mode(self.mode).reads_unlabelled:
            raise ValueError(f"mode {self.mode!r} cannot use unlabelled images (they have no masks); "
                             f"{', '.join(can[:-1])} and {can[-1]} can")
        if self.dataset is None:
            if self.unlabelled is None or not get_mode(self.mode).unlabelled_only:
                raise ValueError(f"dataset: null needs unlabelled.sources and mode diffusion or mdm (got {self.mode!r}); "
                                 f"{self.mode} pretraining needs a labelled source dataset")
        elif self.unlabelled is not None and self.unlabelled.share >= 1:
            raise ValueError("unlabelled.share must be below 1 beside a labelled dataset (1 leaves no labelled image); "
                             "use dataset: null to pretrain on unlabelled images alone")
        if self.num_classes is not None and self.dataset is not None and self.num_classes != self.dataset.mask.num_classes:
            raise ValueError(f"num_classes {self.num_classes} disagrees with dataset {self.dataset.name!r} "
                             f"({self.dataset.mask.num_classes} classes); leave it unset")
        return self

    @property
    def data_name(self) -> str:
        """The dataset(s) pretrained on, for names: the labelled source, then ``+`` each unlabelled source."""
        names = [self.dataset.name] if self.dataset is not None else []
        names += [s.name.replace(":", "-") for s in (self.unlabelled.sources if self.unlabelled else [])]
        return "+".join(names)

    @property
    def channels(self) -> int:
        """Image channels of the network: the labelled dataset's, else the first unlabelled source's (the images of
        every other source are converted to it)."""
        return self.dataset.channels if self.dataset is not None else self.unlabelled.sources[0].dataset.channels

    @property
    def classes(self) -> int:
        return self.dataset.mask.num_classes if self.dataset is not None else (self.num_classes or 2)

    @property
    def folder(self) -> Path:
        return Path(self.output_dir or Path("runs") / "pretrain" / f"{self.data_name}-{self.mode}")

    @property
    def run_name(self) -> str:
        return self.mlflow.run_name or f"pretrain-{self.mode}-{self.data_name}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for a rendezvous or a local server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PretrainResult:
    folder: Path
    checkpoint: Path
    run_id: str | None
    metrics: dict


def pretrain_meta(net: EDMPrecond, cfg: PretrainConfig) -> dict:
    return network_meta(net, cfg.model, cfg.preprocess, cfg.data_name, cfg.mode, cfg.classes)


def training_data(cfg: PretrainConfig, rank: int = 0, world_size: int = 1):
    """``(train, val, sampler)``: the datasets of ``cfg``'s images and the sampler of its batches (None: the harness's
    own). Without unlabelled sources: the source's cached train and val splits. With them: labelled train images
    followed by the unlabelled ones (:class:`medhybrid.data.unlabelled.MixedDataset`), each batch holding
    ``unlabelled.share`` of unlabelled images; validation stays on the source's val split, or, with no labelled dataset,
    on the first ``train.val_max_images`` unlabelled images (a reconstruction monitor, not a held-out score)."""
    if cfg.unlabelled is None:
        train_ds, val_ds = source_datasets(cfg)
        return train_ds, val_ds, None
    key = json.dumps(["unlabelled", dump_config(cfg.unlabelled), cfg.channels, dump_config(cfg.preprocess)], sort_keys=True,
                     default=str)
    if key not in _UNLABELLED_CACHE:
        if cfg.train.check_data:
            check_sources(cfg.unlabelled)
        _UNLABELLED_CACHE.clear()
        _UNLABELLED_CACHE[key] = unlabelled_dataset(cfg.unlabelled, cfg.channels, cfg.preprocess)
    unl = _UNLABELLED_CACHE[key]
    if cfg.dataset is not None:
        train_ds, val_ds = source_datasets(cfg)
        per_batch = mixed_batch(cfg.train.batch_size, cfg.unlabelled.share, cfg.unlabelled.beside)
    else:
        train_ds, per_batch = [], (0, cfg.train.batch_size)
        val_ds = torch.utils.data.Subset(unl, range(min(len(unl), cfg.train.val_max_images or len(unl))))
    mixed = MixedDataset(train_ds, unl)
    sampler = MixedBatchSampler(len(train_ds), len(unl), per_batch, cfg.train.epoch_length, seed=cfg.train.seed,
                                rank=rank, world_size=world_size)
    return mixed, val_ds, sampler


_UNLABELLED_CACHE: dict[str, object] = {}


def source_datasets(cfg: PretrainConfig):
    """Cached train and val datasets of the source domain (val capped at ``train.val_max_images``)."""
    key = json.dumps([dump_config(cfg.dataset), dump_config(cfg.preprocess), cfg.train.val_max_images, cfg.train.check_data],
                     sort_keys=True, default=str)
    if key in _SOURCE_CACHE:  # an ablation pretrains several methods on the same data: check and decode it once
        return _SOURCE_CACHE[key]
    if cfg.train.check_data:
        require_valid(cfg.dataset, splits=["train", "val"])
    train_pairs = load_pairs(cfg.dataset, "train")
    val_pairs = load_pairs(cfg.dataset, "val")[: cfg.train.val_max_images or None]
    t = preprocessing(cfg.dataset, cfg.preprocess)
    kw = dict(transform=t, num_workers=min(4, max(1, cfg.train.num_workers)), progress=False, copy_cache=False)
    _SOURCE_CACHE.clear()  # keep one decoded dataset in memory at a time
    _SOURCE_CACHE[key] = CacheDataset(train_pairs, **kw), CacheDataset(val_pairs, **kw)
    return _SOURCE_CACHE[key]


_SOURCE_CACHE: dict[str, tuple] = {}


def corruption(cfg: PretrainConfig, rank: int = 0):
    """The prepare-batch of ``cfg``'s mode (:class:`medhybrid.engines.batches.CorruptionPrepareBatch`): its noise levels or
    masking, and the hybrid's mask-loss policy, seeded by ``train.seed`` and the process ``rank``."""
    h = cfg.hybrid
    return CorruptionPrepareBatch(cfg.mode, cfg.model.edm, seed=cfg.train.seed, rank=rank, mask_weight=h.mask_weight,
                                  seg_fraction=h.seg_fraction, seg_sigma_max=h.seg_sigma_max, weighting=h.weighting,
                                  mdm_patch=cfg.mdm.patch_size)


def validation(cfg: PretrainConfig, val_ds, eval_net: nn.Module, device: torch.device) -> SupervisedEvaluator:
    """The evaluator of ``cfg``'s mode on the source's validation images: mean Dice of the mask at sigma_min
    (``val_dice``) for the modes that learn masks, else the reconstruction error at fixed corruption levels
    (``val_recon_mse``: noise sigmas, or MDM mask ratios)."""
    loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.train.batch_size, shuffle=False)
    mode = get_mode(cfg.mode)
    if mode.learns_masks:
        metric = {"val_dice": MeanDice(include_background=True, output_transform=dice_output_transform)}
        return SupervisedEvaluator(device=device, val_data_loader=loader, network=eval_net,
                                   prepare_batch=SegmentationPrepareBatch(), inferer=SegmentationInferer(cfg.channels),
                                   key_val_metric=metric, decollate=False)
    levels = levels_of(mode, cfg.val_levels)
    lp = LevelsPrepareBatch(cfg.mode, levels, cfg.model.edm, mdm_patch=cfg.mdm.patch_size)
    ev = SupervisedEvaluator(device=device, val_data_loader=loader, network=eval_net, prepare_batch=lp,
                             inferer=SimpleInferer(),
                             key_val_metric={"val_recon_mse": PerLevelMSE(levels, cfg.channels)}, decollate=False)
    lp.attach(ev)
    return ev


def _worker(local_rank: int, cfg: PretrainConfig, run_id: str | None) -> dict:
    """Training in one process (rank); returns the final metrics."""
    rank = idist.get_rank()
    torch.manual_seed(cfg.train.seed)
    net = build_network(cfg.model, cfg.channels, cfg.classes)
    train_ds, val_ds, sampler = training_data(cfg, rank, idist.get_world_size())
    loss = PretrainLoss(cfg.mode, net.mask_channels, cfg.model.edm.sigma_data)

    def on_validated(trainer, evaluator, eval_net):
        path = preview(cfg, eval_net, val_ds, trainer.state.epoch)
        if run_id:
            tracking.log_artifact(cfg.mlflow, run_id, path, "previews")

    train_cfg = cfg.train
    if sampler is not None and sum(sampler.per_batch) != train_cfg.batch_size:  # unlabelled images beside a full batch
        train_cfg = train_cfg.model_copy(update={"batch_size": sum(sampler.per_batch)})
    result = fit(net, train_ds, corruption(cfg, rank), loss, train_cfg, cfg.folder,
                 make_evaluator=functools.partial(validation, cfg, val_ds),
                 mlflow_handler_factory=functools.partial(tracking.engine_handler, cfg.mlflow, run_id) if (run_id and rank == 0) else None,
                 on_validated=on_validated, checkpoint_prefix="pretrain", sampler=sampler)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if rank == 0:
        save_model(result.network, pretrain_meta(result.network, cfg), cfg.folder / "model.pt")
        runs.write_state(cfg.folder, metrics=metrics, world_size=idist.get_world_size())
    idist.barrier()  # the ranks leave together: none tears the process group down while rank 0 still writes
    return metrics


@torch.no_grad()
def preview(cfg: PretrainConfig, net: EDMPrecond, val_ds, epoch: int, n: int = 6) -> Path:
    """Rows: clean image; noised (sigma 0.5) / masked (MDM) input; reconstruction; predicted mask over
    the image with the reference outline in green."""
    net.eval()
    device = next(net.parameters()).device
    items = [val_ds[i] for i in range(min(n, len(val_ds)))]
    x0 = torch.stack([torch.as_tensor(d["image"]) for d in items]).float().to(device)
    lab = torch.stack([torch.as_tensor(d["label"]) for d in items]).to(device) if "label" in items[0] else None
    g = torch.Generator().manual_seed(0)  # sigma 0.5, or half the patches masked
    xin, sig, kw = get_mode(cfg.mode).at_levels(x0, torch.full((len(items),), 0.5), g, cfg.model.edm, cfg.mdm.patch_size)
    recon = net(xin, sig, **kw)[:, : net.image_channels]
    fg = mask_classes(net.segment(x0)) > 0
    rows = [[to_uint8(x) for x in x0], [to_uint8(x) for x in xin], [to_uint8(x) for x in recon],
            [overlay(x0[i], fg[i], reference=None if lab is None else (lab[i, 0] > 0)) for i in range(len(items))]]
    return save_png(grid(rows), cfg.folder / "previews" / f"epoch_{epoch:03d}.png", upscale=2)


def launched_by_torchrun() -> bool:
    """True in one of several processes started by ``torchrun`` (``torch.distributed.run``), single- or multi-node:
    its environment names this process's rank among ``WORLD_SIZE`` > 1 and the rendezvous."""
    env = os.environ
    return int(env.get("WORLD_SIZE", "1")) > 1 and all(k in env for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _torchrun_worker(local_rank: int, cfg: PretrainConfig, out: list) -> None:
    """One torchrun process: rank 0 claims the run folder and opens (or reopens) the MLflow run, tells every rank
    whether there is anything left to do, and alone writes checkpoints, ``model.pt`` and MLflow."""
    folder, model_path, rank = cfg.folder, cfg.folder / "model.pt", idist.get_rank()
    with runs.Run.claim(folder, config_hash(cfg), cfg.mlflow) if rank == 0 else contextlib.nullcontext() as run:
        decision = None
        if rank == 0:
            if run.finished:
                decision = {"done": True, "run_id": run.run_id, "metrics": run.state.get("metrics", {})}
            else:
                decision = {"done": False, "run_id": _start_pretrain_run(cfg, run)}
            decision = json.dumps(decision)
        decision = json.loads(idist.broadcast(decision, src=0, safe_mode=True))
        run_id = decision["run_id"]
        if decision["done"]:
            log.info("%s: already finished, nothing to do", folder)
            out.append(PretrainResult(folder, model_path, run_id, decision["metrics"]))
            return
        if rank != 0:
            _worker(local_rank, cfg, None)
            idist.barrier()
            return
        metrics = _worker(local_rank, cfg, run_id)
        run.finish([folder / "config.yaml", model_path], metrics=metrics)
    idist.barrier()
    out.append(PretrainResult(folder, model_path, run_id, metrics))


def _start_pretrain_run(cfg: PretrainConfig, run: runs.Run) -> str | None:
    tags = {"medhybrid.stage": "pretrain", "medhybrid.mode": cfg.mode, "medhybrid.dataset": cfg.data_name}
    if cfg.unlabelled is not None:
        tags["medhybrid.data.unlabelled"] = ",".join(s.name for s in cfg.unlabelled.sources)
    return run.start(cfg, cfg.run_name, params=dump_config(cfg), tags=tags, mode=cfg.mode, dataset=cfg.data_name)


def run_pretraining(cfg: PretrainConfig) -> PretrainResult:
    """Pretrain (or resume, or return the finished run of) ``cfg``; see the module docstring.

    Started by ``torchrun`` (:func:`launched_by_torchrun`), each process trains its shard and this returns on every
    rank once rank 0 has written the run (``train.nproc`` is then ignored: torchrun decides the processes)."""
    if launched_by_torchrun() and get_mode(cfg.mode).trains:
        out: list = []
        backend = cfg.train.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        with idist.Parallel(backend=backend) as parallel:  # the rendezvous torchrun's environment describes
            parallel.run(_torchrun_worker, cfg, out)
        return out[0] if out else PretrainResult(cfg.folder, cfg.folder / "model.pt", None, {})

    folder = cfg.folder
    with runs.Run.claim(folder, config_hash(cfg), cfg.mlflow) as run:
        model_path = folder / "model.pt"
        if run.finished:
            log.info("%s: already finished, nothing to do", folder)
            return PretrainResult(folder, model_path, run.run_id, run.state.get("metrics", {}))
        run_id = _start_pretrain_run(cfg, run)
        if not get_mode(cfg.mode).trains:
            torch.manual_seed(cfg.train.seed)
            net = build_network(cfg.model, cfg.channels, cfg.classes)
            save_model(net, pretrain_meta(net, cfg), model_path)
            metrics: dict = {}
        elif cfg.train.nproc > 1:
            backend = cfg.train.backend or ("nccl" if torch.cuda.is_available() else "gloo")
            # a free port per run, not ignite's fixed 2222: two runs (or a lingering socket) never share a rendezvous
            with idist.Parallel(backend=backend, nproc_per_node=cfg.train.nproc, master_addr="127.0.0.1",
                                master_port=free_port()) as parallel:
                parallel.run(_worker, cfg, run_id)
            metrics = runs.read_state(folder).get("metrics", {})
        else:
            metrics = _worker(0, cfg, run_id)
        run.finish([folder / "config.yaml", model_path], metrics=metrics)
        return PretrainResult(folder, model_path, run_id, metrics)


__all__ = ["_SOURCE_CACHE", "_UNLABELLED_CACHE", "corruption", "free_port", "HybridConfig", "launched_by_torchrun",
           "MDMConfig", "MODES", "pretrain_meta", "PretrainConfig", "PretrainResult", "preview", "run_pretraining",
           "source_datasets", "training_data", "validation"]
