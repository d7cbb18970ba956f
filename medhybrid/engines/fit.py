"""The engines: MONAI's ``SupervisedTrainer`` (shared by pretraining and fine-tuning) with medhybrid's seams plugged
in (:mod:`medhybrid.engines.batches`, :mod:`medhybrid.networks.inferers`, :mod:`medhybrid.engines.losses`), atomic
checkpoints, exact resume, EMA, MLflow, progress and multi-process data parallelism through ``ignite.distributed``. No training loop is
written here: :func:`fit` assembles the trainer from small builders and runs it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, EMAHandler, ProgressBar
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler, ValidationHandler
from monai.inferers import SimpleInferer
from monai.optimizers import WarmupCosineSchedule
from pydantic import Field
from torch import nn

from medhybrid.core.config import StrictModel
from medhybrid.core.devices import resolve_device
from medhybrid.core.runs import RunStopped
from medhybrid.core.threads import ThreadPolicy
from medhybrid.engines.batches import EpochSeededSampler
from medhybrid.engines.handlers import GracefulStop, GradientClipping, checkpointer, unwrap
from medhybrid.networks.checkpoints import latest_checkpoint

log = logging.getLogger("medhybrid")


class TrainConfig(StrictModel):
    """Optimisation schedule, fixed by the config (never tuned on a test split)."""

    epochs: int = Field(10, ge=1)
    epoch_length: int = Field(50, ge=1, description="iterations per epoch (batches drawn with a per-epoch seed)")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_iterations: int = Field(50, ge=0)
    grad_clip: float | None = 1.0
    ema_decay: float | None = Field(None, description="EMA of the weights (e.g. 0.999); None = off")
    val_every: int = Field(1, ge=1, description="validate every N epochs")
    val_max_images: int | None = Field(64, description="validate on the first N images of the split (None: all)")
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every N epochs")
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    amp: bool = Field(True, description="bf16 autocast and channels-last on CUDA; ignored on CPU (fp32)")
    compile: bool = Field(False, description="torch.compile the training forward (MONAI SupervisedTrainer's compile): "
                          "a one-off compile (~83 s for the default U-Net on a 2-core CPU, where the compiled steps are "
                          "4-8 % slower: benchmarks/README.md) for fused kernels on CUDA; an execution setting, not part "
                          "of a run's config hash")
    threads: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="CPU threads of PyTorch's kernels: auto = the cores other processes leave free, rechecked "
        "every few seconds (medhybrid.core.threads: a shared machine slows a run about 2x, not 4x); N = fixed; an execution "
        "setting, not part of a run's config hash")
    num_workers: int = 0
    nproc: int = Field(1, ge=1, description="data-parallel processes (ignite.distributed)")
    backend: Literal["gloo", "nccl"] | None = Field(None, description="None: nccl on CUDA, gloo on CPU")
    check_data: bool = Field(True, description="open and check every training/validation file before training")
    progress: bool = Field(True, description="progress bar (on a terminal)")

    @property
    def iterations(self) -> int:
        return self.epochs * self.epoch_length


@dataclass
class FitResult:
    network: nn.Module  # the weights to keep (EMA if enabled), unwrapped
    metrics: dict
    iterations: int
    resumed_from: int


def fit(
    network: nn.Module,
    train_ds,
    prepare_batch,
    loss_function: nn.Module,
    cfg: TrainConfig,
    folder: Path,
    *,
    make_evaluator: Callable[[nn.Module, torch.device], object] | None = None,
    mlflow_handler_factory: Callable[[], object] | None = None,
    on_validated: Callable[[object, object, nn.Module], None] | None = None,
    on_trainer: Callable[[object], None] | None = None,
    checkpoint_prefix: str = "train",
    sampler: torch.utils.data.Sampler | None = None,
) -> FitResult:
    """Train ``network`` on ``train_ds`` with MONAI's ``SupervisedTrainer`` (call inside each process
    when distributed). Resumes from the newest checkpoint in ``folder/checkpoints``. ``sampler`` (this rank's, with
    ``attach(engine)`` setting its epoch, and ``epoch_length * batch_size`` indices read consecutively into batches)
    replaces the default :class:`~medhybrid.engines.batches.EpochSeededSampler` over ``train_ds``."""
    rank, world = idist.get_rank(), idist.get_world_size()
    device = resolve_device(cfg.device)
    network, model = _placed(network, device, cfg, world)
    if sampler is None:
        sampler = EpochSeededSampler(len(train_ds), cfg.epoch_length * cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)
    optimizer, scheduler = _optimiser(network, cfg)
    ema = EMAHandler(network, momentum=1 - cfg.ema_decay) if cfg.ema_decay else None
    eval_net = ema.ema_model if ema else model
    evaluator = make_evaluator(eval_net, device) if make_evaluator else None
    trainer = _trainer(model, device, cfg, _loader(train_ds, sampler, cfg, device), optimizer, scheduler, loss_function,
                       prepare_batch, evaluator)
    sampler.attach(trainer)
    if on_trainer is not None:
        on_trainer(trainer)
    if hasattr(prepare_batch, "attach"):
        prepare_batch.attach(trainer)
    _attach_execution(trainer, cfg, device)
    if ema:
        ema.attach(trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)

    to_save = {"network": network, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": trainer}
    if hasattr(prepare_batch, "checkpointed"):  # state a seam keeps (a mean teacher's weights) resumes with the run
        to_save.update(prepare_batch.checkpointed())
    if ema:
        to_save["ema_model"] = ema.ema_model
    resumed_from = _resume(to_save, trainer, folder, device, cfg.iterations)
    trainer.data_loader.skip = resumed_from % cfg.epoch_length  # resumed mid-epoch: the epoch's batches go on from there
    _attach_loss_summary(trainer, evaluator, loss_function, cfg, rank)
    if evaluator is not None and on_validated is not None and rank == 0:
        evaluator.add_event_handler(Events.COMPLETED, lambda e: on_validated(trainer, e, unwrap(eval_net)))
    if rank == 0:
        _attach_reporting(trainer, evaluator, cfg, mlflow_handler_factory)
    # checkpoint last, after the epoch's summary and MLflow logging: a run killed once its checkpoint exists has
    # recorded everything up to it, so the resumed run (which starts after it) leaves no gap in the metrics
    saver = checkpointer(to_save, folder, checkpoint_prefix)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=cfg.checkpoint_every) | Events.COMPLETED, saver)
    stop = GracefulStop(saver)
    stop.attach(trainer)

    t0 = time.time()
    if resumed_from < cfg.iterations:
        with stop.installed():
            trainer.run()
    log.info("trained %d iterations in %.1f s", trainer.state.iteration - resumed_from, time.time() - t0)
    if stop.signum is not None:
        raise RunStopped(stop.signum, trainer.state.iteration, latest_checkpoint(folder))
    metrics = dict(evaluator.state.metrics) if evaluator is not None and evaluator.state.epoch else {}
    keep = unwrap(ema.ema_model) if ema else unwrap(model)
    return FitResult(network=keep, metrics=metrics, iterations=trainer.state.iteration, resumed_from=resumed_from)


def _placed(network: nn.Module, device: torch.device, cfg: TrainConfig, world: int) -> tuple[nn.Module, nn.Module]:
    """``(network, model)``: the network on ``device`` (channels-last under CUDA autocast), and what the trainer runs
    (the network, or its DistributedDataParallel wrapper)."""
    network = network.to(device)
    if device.type == "cuda" and cfg.amp:
        network = network.to(memory_format=torch.channels_last)
    return network, (idist.auto_model(network, sync_bn=False) if world > 1 else network)


class ResumingLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` whose next pass starts ``skip`` batches in. A run resumed in the middle of an epoch draws, and
    drops, the batches it had already trained on: the epoch's batches and augmentation draws then go on exactly as in
    the uninterrupted run (both are seeded at the start of the epoch, before the first batch is drawn)."""

    skip = 0

    def __iter__(self):
        it = super().__iter__()
        for _ in range(self.skip):
            next(it)
        self.skip = 0
        return it


def _loader(train_ds, sampler, cfg: TrainConfig, device: torch.device) -> torch.utils.data.DataLoader:
    return ResumingLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                                       pin_memory=device.type == "cuda", drop_last=True, persistent_workers=cfg.num_workers > 0)


def _optimiser(network: nn.Module, cfg: TrainConfig):
    """AdamW with a linear warm-up then cosine decay over ``cfg.iterations`` (MONAI's ``WarmupCosineSchedule``)."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=min(cfg.warmup_iterations, cfg.iterations - 1),
                                     t_total=cfg.iterations, warmup_multiplier=0.01)
    return optimizer, scheduler


def _trainer(model, device, cfg: TrainConfig, loader, optimizer, scheduler, loss_function, prepare_batch,
             evaluator) -> SupervisedTrainer:
    """MONAI's ``SupervisedTrainer`` with the LR schedule stepped every iteration and ``evaluator`` run every
    ``cfg.val_every`` epochs; bf16 autocast on CUDA when ``cfg.amp``."""
    cuda = device.type == "cuda"
    handlers = [LrScheduleHandler(scheduler, print_lr=False, epoch_level=False)]
    if evaluator is not None:
        handlers.append(ValidationHandler(validator=evaluator, interval=cfg.val_every, epoch_level=True))
    return SupervisedTrainer(
        device=device, max_epochs=cfg.epochs, epoch_length=cfg.epoch_length, train_data_loader=loader,
        network=model, optimizer=optimizer, loss_function=loss_function, prepare_batch=prepare_batch,
        inferer=SimpleInferer(), amp=cuda and cfg.amp, amp_kwargs={"dtype": torch.bfloat16} if cuda else None,
        decollate=False, train_handlers=handlers, compile=cfg.compile,
    )


def _attach_execution(trainer, cfg: TrainConfig, device: torch.device) -> None:
    """Gradient clipping, and the CPU thread team (:class:`medhybrid.core.threads.ThreadPolicy` or a fixed size)."""
    if cfg.grad_clip:
        GradientClipping(cfg.grad_clip).attach(trainer)
    if device.type == "cpu":
        if cfg.threads == "auto":
            ThreadPolicy().attach(trainer)
        else:
            torch.set_num_threads(cfg.threads)


def _resume(to_save: dict, trainer, folder: Path, device: torch.device, iterations: int) -> int:
    """Load the newest checkpoint in ``folder/checkpoints`` into ``to_save`` (weights only); the iteration it holds."""
    last = latest_checkpoint(folder)
    if last is None:
        return 0
    Checkpoint.load_objects(to_load=to_save, checkpoint=torch.load(last, map_location=device, weights_only=True))
    log.info("resuming from %s (iteration %d of %d)", last, trainer.state.iteration, iterations)
    return trainer.state.iteration


def _attach_loss_summary(trainer, evaluator, loss_function, cfg: TrainConfig, rank: int) -> None:
    """Each epoch's mean loss terms (``loss`` and the loss function's ``terms``) as ``train_<term>`` metrics of the
    trainer, logged by rank 0 with the validation metrics."""
    loss_terms: dict[str, list[float]] = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        for k, v in getattr(loss_function, "terms", {}).items():
            loss_terms.setdefault(k, []).append(v)
        loss_terms.setdefault("loss", []).append(engine.state.output["loss"].item())

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_summary(engine):
        means = {f"train_{k}": sum(v) / len(v) for k, v in loss_terms.items() if v}
        loss_terms.clear()
        engine.state.metrics.update(means)
        if rank == 0:
            val = evaluator.state.metrics if evaluator is not None and evaluator.state.epoch else {}
            shown = ", ".join(f"{k} {v:.4f}" for k, v in {**means, **val}.items() if isinstance(v, float))
            log.info("epoch %d/%d  %s", engine.state.epoch, cfg.epochs, shown)


def _attach_reporting(trainer, evaluator, cfg: TrainConfig, mlflow_handler_factory) -> None:
    """Rank 0's MLflow handlers (trainer and evaluator) and a progress bar on a terminal."""
    if mlflow_handler_factory is not None:
        mlflow_handler_factory().attach(trainer)
        if evaluator is not None:
            mlflow_handler_factory(evaluator=True).attach(evaluator)
    if cfg.progress and sys.stderr.isatty():
        ProgressBar(persist=False).attach(trainer, output_transform=lambda o: {"loss": o["loss"].item()})


