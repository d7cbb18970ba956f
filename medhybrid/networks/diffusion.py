"""Diffusion formulation: EDM (Karras et al., NeurIPS 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"), as small pure functions with the paper's defaults.

Equation and table numbers refer to that paper. Images live in ``[-1, 1]`` (``sigma_data = 0.5``).

- Forward process: ``x_sigma = x_0 + sigma * n``, ``n ~ N(0, I)`` (eq. 1/2 with s(t)=1, sigma(t)=t).
- Denoiser (eq. 7): ``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))``.
- Training (eq. 2, 8; Table 1): ``ln sigma ~ N(P_mean, P_std^2)``, loss ``lambda(sigma) ||D(x;sigma) - x_0||^2``.
- Sampling (Algorithm 1 without churn): Heun's 2nd-order ODE solver on the eq. 5 time steps.

Masked diffusion (MDM, Pan et al. 2023, "Masked Diffusion as Self-supervised Representation Learner")
replaces the noise with a fraction ``t/T`` of masked square patches: :func:`patch_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EDMParams:
    """EDM defaults (Table 1, "Ours")."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    rho: float = 7.0


def c_skip(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Table 1: c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Table 1: c_out = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Table 1: c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1.0 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Table 1: c_noise = ln(sigma) / 4."""
    return sigma.log() / 4.0


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Table 1: lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (= 1 / c_out^2)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_sigma_lognormal(n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """Table 1 training distribution: ln(sigma) ~ N(P_mean, P_std^2)."""
    z = torch.randn(n, generator=generator)
    return (z * p_std + p_mean).exp().to(device)


def sample_sigma_loguniform(n: int, low: float, high: float, generator: torch.Generator | None = None,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """ln(sigma) ~ U(ln low, ln high): the low-noise band where a mask can still be read from the image."""
    u = torch.rand(n, generator=generator)
    return (math.log(low) + u * (math.log(high) - math.log(low))).exp().to(device)


def sampling_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then sigma_N = 0."""
    if steps < 2:
        raise ValueError(f"need at least 2 sampling steps, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor,
                sigmas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 (deterministic Heun sampler, no churn).

    ``denoise(x, sigma)`` returns D(x; sigma) with the shape of ``x``; ``latents`` ~ N(0, I);
    ``sigmas`` from :func:`sampling_sigmas` (decreasing, ending in 0).
    """
    x = latents.double() * sigmas[0]
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d_cur = (x - denoise(x.float(), s_cur.float().expand(x.shape[0])).double()) / s_cur  # line 7: dx/dt
        x_next = x + (s_next - s_cur) * d_cur  # line 8: Euler step
        if s_next > 0:  # line 9-11: 2nd order correction
            d_next = (x_next - denoise(x_next.float(), s_next.float().expand(x.shape[0])).double()) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.float()


def patch_mask(shape: tuple[int, int, int, int], ratio: torch.Tensor, patch: int = 8,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """MDM masking: for each image, a fraction ``ratio[b]`` of the ``patch x patch`` squares is masked.

    Returns a float mask ``(B, 1, H, W)``: 1 = masked, 0 = visible. ``H`` and ``W`` must be multiples
    of ``patch``. The count of masked patches is ``round(ratio * n_patches)``, exact per image.
    """
    b, _, h, w = shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the MDM patch size {patch}")
    gh, gw = h // patch, w // patch
    n = gh * gw
    scores = torch.rand(b, n, generator=generator)
    k = (ratio.cpu().float() * n).round().clamp(0, n).long()
    ranks = scores.argsort(dim=1).argsort(dim=1)
    grid = (ranks < k[:, None]).float().view(b, 1, gh, gw)
    return grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def mdm_sigma(ratio: torch.Tensor, params: EDMParams = EDMParams()) -> torch.Tensor:
    """Noise-level conditioning for an MDM mask ratio t/T in (0, 1]: log-linear between sigma_min and
    sigma_max, so MDM's ratio embedding spans the same c_noise range as the diffusion modes and
    ratio -> 0 (clean image) meets the sigma_min at which every model is fine-tuned."""
    return (math.log(params.sigma_min) + ratio * (math.log(params.sigma_max) - math.log(params.sigma_min))).exp()


def denoising_loss(denoised: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM eq. 2 with Table 1's weight: lambda(sigma) * mean ||D(x; sigma) - x_0||^2, per sample (B,)."""
    err = (denoised.float() - clean.float()).square().flatten(1).mean(1)
    return loss_weight(sigma.float(), sigma_data) * err


__all__ = ["c_in", "c_noise", "c_out", "c_skip", "denoising_loss", "EDMParams", "heun_sample", "loss_weight",
           "mdm_sigma", "patch_mask", "sample_sigma_lognormal", "sample_sigma_loguniform", "sampling_sigmas"]
