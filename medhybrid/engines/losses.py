"""Losses of the pretraining modes and of fine-tuning.

The engine's losses take the network output ``pred`` (B, C_img + C_mask, H, W) of
:class:`medhybrid.networks.nets.EDMPrecond`. :class:`PretrainLoss` takes a target dict from the prepare-batch seam
(:class:`medhybrid.engines.batches.CorruptionPrepareBatch`): ``image`` (clean, [-1, 1]),
``label`` (class indices with :data:`~medhybrid.data.transforms.IGNORE_INDEX`), ``sigma`` (B,), and the
per-sample ``mask_weight`` / ``denoise_weight`` the mode decided.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss, SSIMLoss
from torch import nn

from medhybrid.data.transforms import IGNORE_INDEX
from medhybrid.networks.diffusion import denoising_loss  # noqa: F401 (EDM eq. 2; kept here for its users)
from medhybrid.networks.modes import get_mode


class SegmentationLoss(nn.Module):
    """Soft Dice + cross-entropy on the labelled pixels only (IGNORE_INDEX excluded), per sample (B,).

    Binary tasks (one mask channel): sigmoid Dice + BCE. Multi-class: softmax Dice + CE.
    """

    def __init__(self, mask_channels: int = 1):
        super().__init__()
        self.mask_channels = mask_channels
        binary = mask_channels == 1
        self.dice = MaskedDiceLoss(sigmoid=binary, softmax=not binary, to_onehot_y=not binary,
                                   include_background=binary, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        label = torch.as_tensor(label).float()
        valid = (label != IGNORE_INDEX).float()
        target = label.clamp(min=0)
        n_valid = valid.flatten(1).sum(1).clamp(min=1.0)
        if self.mask_channels == 1:
            ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none").unsqueeze(1)
        ce = (ce * valid).flatten(1).sum(1) / n_valid
        dice = self.dice(logits, target, mask=valid).flatten(1).mean(1)
        return dice + ce


class PretrainLoss(nn.Module):
    """The objective of a pretraining mode (:mod:`medhybrid.networks.modes`: ``mode.objective``) as one loss over a target dict,
    averaged over the batch. It holds the loss modules the modes use (``seg``: :class:`SegmentationLoss`, ``ssim``:
    MONAI's ``SSIMLoss`` for MDM) and ``sigma_data``. The per-sample weights come in the target dict, so the mode's
    noise-level policy lives in the prepare-batch seam. The last batch's terms are kept in :attr:`terms` for logging.
    """

    def __init__(self, mode: str, mask_channels: int = 1, sigma_data: float = 0.5):
        super().__init__()
        self.mode = mode
        self.objective = get_mode(mode)
        self.sigma_data = sigma_data
        self.seg = SegmentationLoss(mask_channels)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=2.0, win_size=7, reduction="none")
        self.terms: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, target: dict) -> torch.Tensor:
        x0 = target["image"]
        c = x0.shape[1]
        total, terms = self.objective.objective(self, pred[:, :c], pred[:, c:], x0, target)
        self.terms = {k: float(v.detach()) for k, v in terms.items()}
        return total.mean()


class FinetuneLoss(nn.Module):
    """Fine-tuning's objective: :class:`SegmentationLoss` on the mask channels of the clean image's output (the network
    fed at sigma_min, :class:`medhybrid.engines.batches.SegmentationPrepareBatch`), averaged over the batch. The last batch's
    value is kept in :attr:`terms` for logging, as :class:`PretrainLoss` does."""

    def __init__(self, image_channels: int, mask_channels: int = 1):
        super().__init__()
        self.image_channels = image_channels
        self.seg = SegmentationLoss(mask_channels)
        self.terms: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        seg = self.seg(pred[:, self.image_channels :], label).mean()
        self.terms = {"mask_loss": float(seg.detach())}
        return seg


__all__ = ["FinetuneLoss", "PretrainLoss", "SegmentationLoss"]
