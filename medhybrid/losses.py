"""Losses of the pretraining modes and of fine-tuning.

The engine's losses take the network output ``pred`` (B, C_img + C_mask, H, W) of
:class:`medhybrid.networks.EDMPrecond`. :class:`PretrainLoss` takes a target dict from the prepare-batch seam
(:class:`medhybrid.batches.CorruptionPrepareBatch`): ``image`` (clean, [-1, 1]),
``label`` (class indices with :data:`~medhybrid.transforms.IGNORE_INDEX`), ``sigma`` (B,), and the
per-sample ``mask_weight`` / ``denoise_weight`` the mode decided.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss, SSIMLoss
from torch import nn

from medhybrid import diffusion as D
from medhybrid.transforms import IGNORE_INDEX


def denoising_loss(denoised: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM eq. 2 with Table 1's weight: lambda(sigma) * mean ||D(x; sigma) - x_0||^2, per sample (B,)."""
    err = (denoised.float() - clean.float()).square().flatten(1).mean(1)
    return D.loss_weight(sigma.float(), sigma_data) * err


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
    """The objective of every pretraining mode, as one loss over a target dict.

    - ``hybrid``: ``denoise_weight * lambda(sigma) ||D - x_0||^2 + mask_weight(sigma) * seg(mask logits)``
    - ``supervised``: ``seg`` at sigma_min; ``diffusion``: the EDM term only
    - ``mdm``: ``1 - SSIM(F_img, x_0)`` (Pan et al. 2023), from the patch-masked image
    The per-sample weights come in the target dict, so the mode's noise-level policy lives in the
    prepare-batch seam. The last batch's terms are kept in :attr:`terms` for logging.
    """

    def __init__(self, mode: str, mask_channels: int = 1, sigma_data: float = 0.5):
        super().__init__()
        self.mode = mode
        self.sigma_data = sigma_data
        self.seg = SegmentationLoss(mask_channels)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=2.0, win_size=7, reduction="none")
        self.terms: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, target: dict) -> torch.Tensor:
        x0 = target["image"]
        c = x0.shape[1]
        img, logits = pred[:, :c], pred[:, c:]
        total = torch.zeros(x0.shape[0], device=x0.device)
        terms = {}
        if self.mode == "mdm":
            ssim = self.ssim(img.float(), x0.float()).flatten(1).mean(1)
            total = total + ssim
            terms["ssim_loss"] = ssim.mean()
        if self.mode in ("hybrid", "diffusion"):
            den = denoising_loss(img, x0, target["sigma"], self.sigma_data) * target.get("denoise_weight", 1.0)
            total = total + den
            terms["denoise_loss"] = den.mean()
        if self.mode in ("hybrid", "supervised"):
            w = target.get("mask_weight")
            seg = self.seg(logits, target["label"])
            lab = target.get("labelled")  # batches mixing in unlabelled images: their mask term is 0, not averaged in
            terms["mask_loss"] = seg.mean() if lab is None else (seg * lab).sum() / lab.sum().clamp(min=1)
            total = total + (seg if w is None else w * seg)
        self.terms = {k: float(v.detach()) for k, v in terms.items()}
        return total.mean()


class FinetuneLoss(nn.Module):
    """Fine-tuning's objective: :class:`SegmentationLoss` on the mask channels of the clean image's output (the network
    fed at sigma_min, :class:`medhybrid.batches.SegmentationPrepareBatch`), averaged over the batch. The last batch's
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
