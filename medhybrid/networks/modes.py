"""The pretraining modes, each one small object: how a clean batch is corrupted and what the network must recover.

A mode says, in one place (NVlabs/edm's ``training/loss.py`` is the model: one objective, one callable):

- :meth:`PretrainMode.corrupt`: the network's input, its noise level and conditioning, and the targets' extra
  weights, for a clean batch (the prepare-batch seam, :class:`medhybrid.engines.batches.CorruptionPrepareBatch`, calls it
  with a generator seeded by the iteration);
- :meth:`PretrainMode.objective`: the per-sample loss from the network's output (:class:`medhybrid.engines.losses.PretrainLoss`
  calls it);
- :meth:`PretrainMode.at_levels`: the input at fixed corruption levels, for validation and previews of the modes that
  do not learn masks;
- what it needs and learns (``learns_masks``, ``reads_unlabelled``, ``unlabelled_only``).

A new mode is one new subclass here, decorated with :func:`register`; configs name it by ``name``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from medhybrid.core.registry import Registry
from medhybrid.networks import diffusion as D

__all__ = ["PretrainMode", "register", "get_mode", "mode_names", "Hybrid", "Supervised", "Diffusion", "MaskedDiffusion",
           "NoPretraining"]

_REGISTRY: Registry[PretrainMode] = Registry("pretraining mode")
register = _REGISTRY.register
"""Class decorator: make the mode available by its ``name``."""
get_mode = _REGISTRY.get
"""The registered mode called ``name``; ValueError naming the known ones otherwise."""
mode_names = _REGISTRY.names


class PretrainMode:
    """One pretraining objective. Subclasses set the class attributes and override what they do differently."""

    name: ClassVar[str] = ""
    learns_masks: ClassVar[bool] = False
    """Trains the mask channels (validated by mask Dice; needs a labelled source)."""
    reads_unlabelled: ClassVar[bool] = False
    """Can use images without masks (their mask term is 0)."""
    unlabelled_only: ClassVar[bool] = False
    """Can train on unlabelled images alone (``dataset: null``)."""
    trains: ClassVar[bool] = True
    """False for ``none``: the network is written as initialised."""
    validation_levels: ClassVar[tuple[float, ...] | None] = None
    """Fixed corruption levels of the reconstruction validation (None: the config's ``val_levels``, noise sigmas)."""

    def corrupt(self, prep, x0: torch.Tensor, labelled: torch.Tensor | None,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
        """``(input, sigma, network kwargs, extra targets)`` for the clean batch ``x0``; ``prep`` is the prepare-batch
        holding the settings (EDM parameters, the hybrid's policy, MDM's patch size)."""
        raise NotImplementedError

    def objective(self, loss, img: torch.Tensor, logits: torch.Tensor, x0: torch.Tensor,
                  target: dict) -> tuple[torch.Tensor, dict]:
        """``(per-sample loss (B,), terms for logging)`` from the image channels ``img`` and mask ``logits`` of the
        output; ``loss`` (:class:`medhybrid.engines.losses.PretrainLoss`) holds the loss modules and ``sigma_data``."""
        raise NotImplementedError

    def at_levels(self, x0: torch.Tensor, levels: torch.Tensor, g: torch.Generator, edm: D.EDMParams,
                  patch: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(input, sigma, network kwargs)``: ``x0`` corrupted at the given levels (noise sigmas by default)."""
        sigma = levels.to(x0.device)
        return x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g).to(x0.device), sigma, {}

    # shared pieces
    @staticmethod
    def _noised(prep, x0: torch.Tensor, labelled, g: torch.Generator, low_band: bool) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = prep.sigmas(x0.shape[0], g, labelled, low_band=low_band)
        noise = torch.randn(x0.shape, generator=g)
        sigma = sigma.to(x0.device)
        return x0 + sigma.view(-1, 1, 1, 1) * noise.to(x0.device), sigma

    @staticmethod
    def _denoise_term(loss, img, x0, target) -> torch.Tensor:
        """EDM eq. 2 with Table 1's weight, per sample (:func:`medhybrid.networks.diffusion.denoising_loss`)."""
        return D.denoising_loss(img, x0, target["sigma"], loss.sigma_data) * target.get("denoise_weight", 1.0)

    @staticmethod
    def _mask_term(loss, logits, target) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weighted per-sample mask loss, mean over the labelled samples)``: an unlabelled sample's term is 0."""
        w = target.get("mask_weight")
        seg = loss.seg(logits, target["label"])
        lab = target.get("labelled")
        mean = seg.mean() if lab is None else (seg * lab).sum() / lab.sum().clamp(min=1)
        return (seg if w is None else w * seg), mean


@register
class Hybrid(PretrainMode):
    """Sauvalle & Salzmann 2024: denoise the noised image and predict its mask from it. The mask loss meets the noise
    levels through the hybrid policy of the prepare-batch (a low band of sigmas for part of the batch, a per-sample
    weight ``mask_weight * w(sigma)``)."""

    name = "hybrid"
    learns_masks = True
    reads_unlabelled = True

    def corrupt(self, prep, x0, labelled, g):
        x, sigma = self._noised(prep, x0, labelled, g, low_band=True)
        return x, sigma, {}, {"mask_weight": prep.mask_weights(sigma, labelled)}

    def objective(self, loss, img, logits, x0, target):
        total = torch.zeros(x0.shape[0], device=x0.device)
        den = self._denoise_term(loss, img, x0, target)
        total = total + den
        seg, mean = self._mask_term(loss, logits, target)
        return total + seg, {"denoise_loss": den.mean(), "mask_loss": mean}


@register
class Supervised(PretrainMode):
    """The mask loss alone, on the clean image at sigma_min."""

    name = "supervised"
    learns_masks = True

    def corrupt(self, prep, x0, labelled, g):
        return x0, torch.full((x0.shape[0],), prep.edm.sigma_min, device=x0.device), {}, {}

    def objective(self, loss, img, logits, x0, target):
        total = torch.zeros(x0.shape[0], device=x0.device)
        seg, mean = self._mask_term(loss, logits, target)
        return total + seg, {"mask_loss": mean}


@register
class Diffusion(PretrainMode):
    """EDM's denoising objective alone (Karras et al. 2022): log-normal noise levels, ``lambda(sigma)``-weighted MSE."""

    name = "diffusion"
    reads_unlabelled = True
    unlabelled_only = True

    def corrupt(self, prep, x0, labelled, g):
        x, sigma = self._noised(prep, x0, labelled, g, low_band=False)
        return x, sigma, {}, {}

    def objective(self, loss, img, logits, x0, target):
        total = torch.zeros(x0.shape[0], device=x0.device)
        den = self._denoise_term(loss, img, x0, target)
        return total + den, {"denoise_loss": den.mean()}


@register
class MaskedDiffusion(PretrainMode):
    """MDM (Pan et al. 2023): patches masked at a random ratio instead of noise, ``1 - SSIM`` of the reconstruction;
    the network sees the masked image without EDM's input scaling, conditioned on a sigma that grows with the ratio."""

    name = "mdm"
    reads_unlabelled = True
    unlabelled_only = True
    validation_levels = (0.25, 0.5, 0.75)

    def corrupt(self, prep, x0, labelled, g):
        ratio = torch.rand(x0.shape[0], generator=g)
        m = D.patch_mask(tuple(x0.shape), ratio, prep.mdm_patch, generator=g).to(x0.device)
        return x0 * (1 - m), D.mdm_sigma(ratio, prep.edm).to(x0.device), {"precondition": False}, {}

    def objective(self, loss, img, logits, x0, target):
        total = torch.zeros(x0.shape[0], device=x0.device)
        ssim = loss.ssim(img.float(), x0.float()).flatten(1).mean(1)
        return total + ssim, {"ssim_loss": ssim.mean()}

    def at_levels(self, x0, levels, g, edm, patch):
        m = D.patch_mask(tuple(x0.shape), levels, patch, generator=g).to(x0.device)
        return x0 * (1 - m), D.mdm_sigma(levels, edm).to(x0.device), {"precondition": False}


@register
class NoPretraining(PretrainMode):
    """No pretraining: the network as initialised (training from scratch starts from it)."""

    name = "none"
    trains = False


def levels_of(mode: PretrainMode, configured: Sequence[float]) -> list[float]:
    """The validation levels of ``mode``: its own (MDM's mask ratios) or the configured noise sigmas."""
    return list(mode.validation_levels) if mode.validation_levels is not None else list(configured)
