"""One network for every method: MONAI's noise-level-conditioned ``DiffusionModelUNet`` backbone F
with ``image channels + mask channels`` outputs, wrapped by EDM preconditioning (eq. 7) that stays out
of the backbone.

``EDMPrecond(x, sigma)`` returns ``(B, C_img + C_mask, H, W)``: the first ``C_img`` channels are the
denoised estimate ``D(x; sigma)``, the rest are mask logits read straight from F (no skip). Fine-tuning
and inference feed the clean image at ``sigma_min`` (:meth:`EDMPrecond.segment`).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from pydantic import Field, model_validator
from torch import nn

from medhybrid.core.config import StrictModel
from medhybrid.networks import diffusion as D


class ModelConfig(StrictModel):
    """Backbone size (MONAI ``DiffusionModelUNet``) and EDM constants."""

    channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = 16
    num_head_channels: int = 32
    noise_embed_scale: float = Field(250.0, description="c_noise (= ln(sigma)/4) is multiplied by this before the "
                                     "sinusoidal embedding, to span the range MONAI's embedding was built for (~0..1000)")
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    @model_validator(mode="after")
    def _check(self):
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(f"attention_levels ({len(self.attention_levels)}) must match channels ({len(self.channels)})")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not multiples of norm_num_groups={self.norm_num_groups}")
        return self

    @property
    def edm(self) -> D.EDMParams:
        return D.EDMParams(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data)


def mask_channels_for(num_classes: int) -> int:
    """One sigmoid channel for a binary task, one softmax channel per class otherwise."""
    return 1 if num_classes <= 2 else num_classes


def mask_classes(logits: torch.Tensor) -> torch.Tensor:
    """The one rule from mask logits (B, C_mask, H, W) to class indices (B, H, W): ``logit > 0`` (probability > 0.5)
    for one sigmoid channel, argmax over the softmax channels otherwise."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


class EDMPrecond(nn.Module):
    """EDM-preconditioned wrapper around a backbone ``F(x, timesteps)`` with C_img + C_mask outputs."""

    def __init__(self, backbone: nn.Module, image_channels: int, mask_channels: int, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, noise_embed_scale: float = 250.0):
        super().__init__()
        self.backbone = backbone
        self.image_channels = image_channels
        self.mask_channels = mask_channels
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.noise_embed_scale = noise_embed_scale

    def _sigma(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if sigma is None:
            sigma = self.sigma_min
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float | None = None, precondition: bool = True) -> torch.Tensor:
        """``x``: noised image (B, C_img, H, W); ``sigma``: its noise level (B,) (default sigma_min).

        With ``precondition=False`` (MDM) the image channels are F's raw output, and the input is scaled
        as a clean image (c_in(sigma_min)); the conditioning still follows ``sigma``.
        """
        return edm_output(self, x, sigma, precondition)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float | None = None, precondition: bool = True) -> torch.Tensor:
        """The whole output (image, then mask channels) at noise level ``sigma``: :meth:`forward`."""
        return self.forward(x, sigma, precondition)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits for clean images, fed at sigma_min."""
        return self.forward(x, None)[:, self.image_channels :]


def edm_output(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float | None = None,
               precondition: bool = True) -> torch.Tensor:
    """EDM's preconditioning (Karras et al. 2022, eq. 7) around ``net.backbone``: the output (B, C_img + C_mask, H, W)
    of a module with EDMPrecond's attributes (``backbone``, ``image_channels``, ``sigma_data``, ``sigma_min``,
    ``noise_embed_scale``) for the image ``x`` at noise level ``sigma`` (None: sigma_min)."""
    if sigma is None:
        sigma = net.sigma_min
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)
    s = sigma.view(-1, 1, 1, 1)
    in_scale = D.c_in(s if precondition else torch.full_like(s, net.sigma_min), net.sigma_data)
    t = D.c_noise(sigma) * net.noise_embed_scale
    f = net.backbone(in_scale * x, timesteps=t)
    f_img, f_mask = f[:, : net.image_channels], f[:, net.image_channels :]
    if precondition:
        img = D.c_skip(s, net.sigma_data) * x + D.c_out(s, net.sigma_data) * f_img.float()  # eq. 7
    else:
        img = f_img
    return torch.cat([img.to(f.dtype), f_mask], dim=1)


def build_network(cfg: ModelConfig, image_channels: int, num_classes: int = 2) -> EDMPrecond:
    """The U-Net used by every method: same architecture whatever the pretraining mode."""
    mask_ch = mask_channels_for(num_classes)
    backbone = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=image_channels,
        out_channels=image_channels + mask_ch,
        num_res_blocks=cfg.num_res_blocks,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
    )
    return EDMPrecond(backbone, image_channels, mask_ch, cfg.sigma_data, cfg.sigma_min, cfg.noise_embed_scale)


__all__ = ["build_network", "edm_output", "EDMPrecond", "mask_channels_for", "mask_classes", "ModelConfig"]
