"""The Ignite handlers medhybrid attaches to MONAI's engines: atomic checkpoints that name a full disk, a graceful
stop on SIGTERM/SIGINT, gradient clipping, and WiSE-FT at the end of training."""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import signal
import threading
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.engines.utils import IterationEvents
from torch import nn

from medhybrid.core.files import DiskFull
from medhybrid.networks.checkpoints import interpolate_weights

log = logging.getLogger("medhybrid")


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if hasattr(net, "module") and isinstance(net, nn.parallel.DistributedDataParallel) else net


class CheckpointSaver(DiskSaver):
    """Ignite's atomic ``DiskSaver``; a write that runs out of space (``ENOSPC``, or PyTorch's own writer failing on a
    disk with less free space than the checkpoint needs) raises :class:`DiskFull` in one line. The partial file is
    removed by ``DiskSaver`` and older checkpoints are kept, so the run resumes from the last one once there is room."""

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        try:
            super().__call__(checkpoint, filename, metadata)
        except (OSError, RuntimeError) as e:
            full = isinstance(e, OSError) and e.errno == errno.ENOSPC
            if not full and isinstance(e, RuntimeError) and "write" in str(e):
                full = shutil.disk_usage(self.dirname).free < 64 * 2**20
            if not full:
                raise
            raise DiskFull(errno.ENOSPC, f"no space left on device writing checkpoint {Path(self.dirname) / filename}; the "
                                         "previous checkpoint is intact: free some space and run the same command to resume",
                           str(Path(self.dirname) / filename)) from e


class GracefulStop:
    """SIGTERM or SIGINT while a trainer runs (a scheduler's pre-emption, Ctrl-C) asks for a stop: at the end of the
    current iteration (or, at the end of an epoch, after its validation and logging) the checkpointer writes a
    checkpoint and the trainer terminates; :func:`fit` then raises :class:`RunStopped`. A second signal interrupts at
    once. When several processes train together, they stop at the same iteration (the request is all-reduced)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer: Checkpoint):
        self.checkpointer = checkpointer
        self.signum: int | None = None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._at_iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._stop_if_asked)

    def _asked(self) -> bool:
        if idist.get_world_size() > 1:
            flag = torch.tensor([self.signum or 0], device=idist.device())
            self.signum = int(idist.all_reduce(flag, op="MAX").item()) or None
        return self.signum is not None

    def _at_iteration(self, engine) -> None:
        if engine.state.iteration % engine.state.epoch_length:  # at an epoch's end: after its handlers
            self._stop_if_asked(engine)

    def _stop_if_asked(self, engine) -> None:
        if self._asked():
            self.checkpointer(engine)
            engine.terminate(skip_completed=True)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: writing a checkpoint after this iteration, then stopping (send it again to stop at once)",
                    signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self):
        """The signal handlers, for the body (only the main thread may install them; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def checkpointer(to_save: dict, folder: Path, prefix: str) -> Checkpoint:
    """Ignite's ``Checkpoint`` of ``to_save`` in ``folder/checkpoints`` (atomic writes, the last two kept), named by
    iteration."""
    return Checkpoint(to_save, CheckpointSaver(str(Path(folder) / "checkpoints"), require_empty=False, atomic=True, create_dir=True),
                      filename_prefix=prefix, n_saved=2, global_step_transform=lambda e, _: e.state.iteration)


class GradientClipping:
    """Clip the global gradient norm after backward, before the optimizer step (MONAI's
    ``BACKWARD_COMPLETED`` event)."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        if getattr(engine, "scaler", None) is not None and engine.amp:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class WiSEFT:
    """WiSE-FT as a trainer handler (Wortsman et al. 2022, eq. 1): the weights the network has when training starts
    (after any ``CheckpointLoader`` listed before this handler has loaded them) are kept, and when training completes
    the network becomes ``(1 - alpha) * start + alpha * trained``, in place, so whatever saves it afterwards saves the
    interpolation. ``alpha = 1`` leaves the trained weights alone. A bundle's ``train.json`` lists it after its
    ``CheckpointLoader``; :func:`medhybrid.workflows.finetune.run_finetuning` interpolates the same way (its ``wise`` field).
    The start is whatever the network holds when the engine starts: on a run resumed from a mid-run checkpoint that is
    the checkpoint, not the pretraining, so a resumable run keeps its start itself (as ``run_finetuning`` does)."""

    def __init__(self, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"WiSE-FT alpha must lie in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.start: dict[str, torch.Tensor] | None = None
        self.applied = False
        """Whether the network now holds an interpolation (set at COMPLETED when ``alpha < 1``)."""

    def attach(self, engine) -> None:
        if self.alpha < 1.0:
            engine.add_event_handler(Events.STARTED, self.keep_start)
            engine.add_event_handler(Events.COMPLETED, self.interpolate)

    def keep_start(self, engine) -> None:
        self.start = {k: v.detach().clone() for k, v in unwrap(engine.network).state_dict().items()}

    def interpolate(self, engine) -> None:
        net = unwrap(engine.network)
        net.load_state_dict(interpolate_weights(self.start, net.state_dict(), self.alpha))
        self.applied = True
        log.info("WiSE-FT: the trained weights interpolated with the starting ones at %.2f x trained + %.2f x start",
                 self.alpha, 1 - self.alpha)

