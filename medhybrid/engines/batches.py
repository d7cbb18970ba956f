"""Prepare-batch seams of MONAI's Ignite engines (what each engine iteration feeds the network) and the seeded
samplers that decide which images make each batch.

Randomness is a pure function of ``(seed, iteration, rank)`` (noise, masks) and ``(seed, epoch)`` (data order), so a
run resumed from a checkpoint continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines import PrepareBatch
from monai.utils import CommonKeys as Keys

from medhybrid.networks import diffusion as D
from medhybrid.networks.modes import get_mode


def as_plain_tensor(x) -> torch.Tensor:
    """A MetaTensor as a plain tensor (metadata dropped); anything else unchanged."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, step, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))


class CorruptionPrepareBatch(PrepareBatch):
    """Prepare-batch seam of pretraining: corrupt the clean image as the mode asks.

    Returns ``(inputs, targets, (), kwargs)``: ``inputs`` the corrupted image, ``targets`` a dict
    (``image`` clean, ``label``, ``sigma``, ``mask_weight``) for :class:`medhybrid.engines.losses.PretrainLoss`,
    ``kwargs`` the network's conditioning (``sigma``, and ``precondition=False`` for MDM).

    Hybrid noise-level policy (how the mask loss meets the noise levels): a fraction ``seg_fraction``
    of each batch takes sigma log-uniform in ``[sigma_min, seg_sigma_max]`` (where the mask is still
    visible), the rest EDM's log-normal; the per-sample mask-loss weight is
    ``mask_weight * w(sigma)`` with ``w`` = 1 (``all``), ``1[sigma <= seg_sigma_max]`` (``low``) or
    ``c_skip(sigma)`` (``cskip``). ``seg_fraction=0, weighting=all`` is the naive hybrid.

    Batches that mix in unlabelled images (:mod:`medhybrid.data.unlabelled`) carry ``labelled`` (B,): the low band is
    drawn for a ``seg_fraction`` of the *labelled* samples, and an unlabelled sample's mask weight is exactly 0
    whatever its sigma, so it only ever meets the denoising (or masked-patch) objective.
    """

    def __init__(self, mode: str, edm: D.EDMParams = D.EDMParams(), seed: int = 0, rank: int = 0,
                 mask_weight: float = 1.0, seg_fraction: float = 0.0, seg_sigma_max: float = 0.1,
                 weighting: str = "all", mdm_patch: int = 8):
        self.mode, self.edm, self.seed, self.rank = mode, edm, seed, rank
        self.corruption = get_mode(mode)
        self.mask_weight, self.seg_fraction, self.seg_sigma_max = mask_weight, seg_fraction, seg_sigma_max
        self.weighting, self.mdm_patch = weighting, mdm_patch
        self.step = 0

    def attach(self, engine: Engine) -> None:
        """Keep :attr:`step` equal to the engine's iteration (set before each batch is prepared)."""
        engine.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(self, "step", e.state.iteration))

    def sigmas(self, n: int, g: torch.Generator, labelled: torch.Tensor | None = None, low_band: bool | None = None) -> torch.Tensor:
        """EDM's log-normal sigmas; with ``low_band`` (default: in hybrid mode) the first ``seg_fraction`` of the
        labelled samples (all samples when ``labelled`` is None) take the low band instead."""
        e = self.edm
        sigma = D.sample_sigma_lognormal(n, e.p_mean, e.p_std, generator=g)
        low_band = self.mode == "hybrid" if low_band is None else low_band
        if low_band and self.seg_fraction > 0:
            idx = torch.arange(n) if labelled is None else torch.nonzero(labelled.cpu() > 0).flatten()
            k = int(round(self.seg_fraction * len(idx)))
            sigma[idx[:k]] = D.sample_sigma_loguniform(k, e.sigma_min, self.seg_sigma_max, generator=g)
        return sigma

    def mask_weights(self, sigma: torch.Tensor, labelled: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample mask-loss weight: ``mask_weight * w(sigma)``, times 0 for an unlabelled sample."""
        if self.weighting == "low":
            w = (sigma <= self.seg_sigma_max * (1 + 1e-6)).float()
        elif self.weighting == "cskip":
            w = D.c_skip(sigma, self.edm.sigma_data)
        else:
            w = torch.ones_like(sigma)
        w = self.mask_weight * w
        return w if labelled is None else w * (labelled.to(w.device) > 0).float()

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        x0 = as_plain_tensor(batchdata[Keys.IMAGE]).to(device=device, non_blocking=non_blocking).float()
        label = batchdata.get(Keys.LABEL)
        label = None if label is None else as_plain_tensor(label).to(device=device, non_blocking=non_blocking)
        labelled = batchdata.get("labelled")
        labelled = None if labelled is None else as_plain_tensor(labelled).float().flatten()
        g = step_generator(self.seed, self.step, self.rank)
        x, sigma, net_kwargs, extra = self.corruption.corrupt(self, x0, labelled, g)
        net_kwargs = {**net_kwargs, "sigma": sigma}
        targets = {"image": x0, "label": label, "sigma": sigma, **extra}
        if labelled is not None:
            targets["labelled"] = labelled.to(x0.device)
        return x, targets, (), net_kwargs


class SegmentationPrepareBatch(PrepareBatch):
    """The clean image and its label, the network fed at sigma_min (no conditioning given): fine-tuning's batches and
    the validation of the pretraining modes that learn masks."""

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        x = as_plain_tensor(batchdata[Keys.IMAGE]).to(device=device, non_blocking=non_blocking).float()
        y = batchdata.get(Keys.LABEL)
        y = None if y is None else as_plain_tensor(y).to(device=device, non_blocking=non_blocking)
        return x, y, (), {}


class LevelsPrepareBatch(PrepareBatch):
    """Validation of the unlabelled modes: each image corrupted at every level of ``levels`` (noise
    sigmas, or MDM mask ratios) with noise fixed per (batch index, level), so numbers compare across epochs."""

    def __init__(self, mode: str, levels: Sequence[float], edm: D.EDMParams = D.EDMParams(), seed: int = 1234, mdm_patch: int = 8):
        self.mode, self.levels, self.edm, self.seed, self.mdm_patch = mode, list(levels), edm, seed, mdm_patch
        self.corruption = get_mode(mode)
        self.batch_index = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: setattr(self, "batch_index", 0))
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: setattr(self, "batch_index", self.batch_index + 1))

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        x0 = as_plain_tensor(batchdata[Keys.IMAGE]).to(device=device, non_blocking=non_blocking).float()
        b, n = x0.shape[0], len(self.levels)
        g = step_generator(self.seed, self.batch_index)
        lv = torch.tensor(self.levels, dtype=torch.float32).repeat_interleave(b)
        x0r = x0.repeat(n, 1, 1, 1)
        x, sigma, kw = self.corruption.at_levels(x0r, lv, g, self.edm, self.mdm_patch)
        kw = {**kw, "sigma": sigma}
        return x, {"image": x0r, "level_index": torch.arange(n).repeat_interleave(b).to(x0.device)}, (), kw


class EpochSeededSampler(torch.utils.data.Sampler):
    """Exactly ``num_samples`` indices per epoch, drawn with replacement from a generator seeded by
    (seed, epoch): the data order is a function of the epoch, so resumed runs see the same batches."""

    def __init__(self, data_len: int, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.data_len, self.num_samples, self.seed = data_len, num_samples, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def draw(g: torch.Generator, size: int, total: int) -> torch.Tensor:
        """``total`` indices of ``range(size)``: whole permutations one after another, the last one cut."""
        if not total:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.randperm(size, generator=g) for _ in range(math.ceil(total / size))])[:total]

    def __iter__(self):
        g = step_generator(self.seed, 10_000 + self.epoch)
        order = self.draw(g, self.data_len, self.num_samples * self.world_size)
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.set_epoch(e.state.epoch))


class MixedBatchSampler(EpochSeededSampler):
    """:class:`EpochSeededSampler` over a labelled part (indices ``0..n_labelled-1``) and an unlabelled part (the
    indices after it), yielding ``num_batches`` batches of ``batch_size`` whose first ``per_batch[0]`` indices are
    labelled and the last ``per_batch[1]`` unlabelled (read consecutively by a ``DataLoader`` with that batch size).

    Each part is drawn without replacement within its own permutations, seeded by (seed, epoch); global batch ``j`` goes
    to rank ``j % world_size``, so ranks never repeat or drop an index within an epoch's draw.
    """

    def __init__(self, n_labelled: int, n_unlabelled: int, per_batch: tuple[int, int], num_batches: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if (per_batch[0] and not n_labelled) or (per_batch[1] and not n_unlabelled):
            raise ValueError(f"batches of {per_batch} (labelled, unlabelled) need both kinds of images, have "
                             f"{n_labelled} labelled and {n_unlabelled} unlabelled")
        self.sizes, self.per_batch, self.num_batches = (n_labelled, n_unlabelled), per_batch, num_batches
        super().__init__(n_labelled + n_unlabelled, num_batches * sum(per_batch), seed, rank, world_size)

    def __iter__(self):
        g = step_generator(self.seed, 10_000 + self.epoch)
        batches = self.num_batches * self.world_size
        (kl, ku), nl = self.per_batch, self.sizes[0]
        lab = self.draw(g, self.sizes[0], batches * kl).view(batches, kl)
        unl = self.draw(g, self.sizes[1], batches * ku).view(batches, ku) + nl
        order = torch.cat([lab, unl], dim=1)[self.rank :: self.world_size]
        return iter(order.flatten().tolist())


__all__ = ["as_plain_tensor", "CorruptionPrepareBatch", "EpochSeededSampler", "LevelsPrepareBatch",
           "MixedBatchSampler", "SegmentationPrepareBatch", "step_generator"]
