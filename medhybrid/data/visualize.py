"""Preview images: tensors in [-1, 1] to uint8 tiles, mask overlays and PNG grids."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medhybrid.core.files import atomic_write


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    a = ((torch.as_tensor(img).detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    a = np.moveaxis(a, 0, -1)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]


def overlay(img: torch.Tensor, mask: torch.Tensor, color=(255, 40, 40), alpha: float = 0.45,
            reference: torch.Tensor | None = None) -> np.ndarray:
    """Image with ``mask`` (H, W) > 0 tinted; with ``reference``, its outline is drawn in green."""
    base = to_uint8(img).astype(np.float32)
    m = torch.as_tensor(mask).detach().cpu().numpy().reshape(base.shape[:2]) > 0
    base[m] = (1 - alpha) * base[m] + alpha * np.asarray(color, dtype=np.float32)
    if reference is not None:
        r = torch.as_tensor(reference).detach().cpu().numpy().reshape(base.shape[:2]) > 0
        edge = r & ~(np.roll(r, 1, 0) & np.roll(r, -1, 0) & np.roll(r, 1, 1) & np.roll(r, -1, 1))
        base[edge] = (40, 255, 40)
    return base.round().astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile equal-sized (H, W, 3) uint8 arrays row by row."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, tile in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = tile
    return out


def save_png(arr: np.ndarray, path: str | os.PathLike, upscale: int = 1) -> Path:
    im = Image.fromarray(arr)
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    with atomic_write(path) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)


__all__ = ["grid", "overlay", "save_png", "to_uint8"]
