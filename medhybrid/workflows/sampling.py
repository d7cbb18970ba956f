"""Joint sampling of (image, mask) pairs from a hybrid model.

The hybrid network is a generative model of pairs: its image channels define p(x) through the
diffusion ODE, and its mask channels give p(y | x) from the same features. A pair is drawn by
integrating the probability-flow ODE with EDM's Heun sampler (Algorithm 1, eq. 5 steps) from pure
noise to a clean image, then reading the mask channels at sigma_min on that image.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medhybrid.data.visualize import grid, overlay, save_png, to_uint8
from medhybrid.networks import diffusion as D
from medhybrid.networks.checkpoints import load_model
from medhybrid.networks.nets import EDMPrecond, mask_classes


@torch.no_grad()
def sample_pairs(net: EDMPrecond, num: int, size: int, steps: int = 18, seed: int = 0, sigma_max: float | None = None,
                 batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` images (num, C, size, size) in [-1, 1] and their mask logits (num, C_mask, size, size)."""
    net.eval()
    device = next(net.parameters()).device
    sigmas = D.sampling_sigmas(steps, net.sigma_min, sigma_max or 80.0).to(device)
    g = torch.Generator().manual_seed(seed)
    images, masks = [], []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        latents = torch.randn(n, net.image_channels, size, size, generator=g).to(device)
        x = D.heun_sample(lambda z, s: net(z, s)[:, : net.image_channels], latents, sigmas).clamp(-1, 1)
        images.append(x.cpu())
        masks.append(net.segment(x).cpu())
    return torch.cat(images), torch.cat(masks)


def sample_to_grid(checkpoint: str | os.PathLike, out: str | os.PathLike, num: int = 16, steps: int = 18, seed: int = 0,
                   per_row: int = 8) -> Path:
    """Sample ``num`` pairs from ``checkpoint`` (a ``model.pt``) and save a PNG grid: rows of images,
    each followed by the same images with their sampled masks overlaid."""
    net, meta = load_model(checkpoint)
    if meta["mode"] not in ("hybrid", "diffusion"):
        raise ValueError(f"{checkpoint}: a {meta['mode']!r} model is not a diffusion model; sample from a hybrid "
                         "(image + mask) or diffusion (image only) checkpoint")
    size = int(meta["preprocess"]["resolution"])
    images, logits = sample_pairs(net, num, size, steps, seed)
    fg = mask_classes(logits) > 0
    rows = []
    for s in range(0, num, per_row):
        idx = range(s, min(s + per_row, num))
        rows.append([to_uint8(images[i]) for i in idx])
        if meta["mode"] == "hybrid":
            rows.append([overlay(images[i], fg[i]) for i in idx])
    return save_png(grid(rows), out, upscale=2)


__all__ = ["sample_pairs", "sample_to_grid"]
