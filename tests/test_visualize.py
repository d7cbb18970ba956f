"""medhybrid.data.visualize: uint8 tiles, mask overlays, grids and PNG files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medhybrid.data.visualize import grid, overlay, save_png, to_uint8

pytestmark = pytest.mark.usefixtures("workdir")


def test_to_uint8_range_and_channels():
    grey = torch.tensor([[[-1.0, 0.0, 1.0, 3.0, -7.0]]])  # (1, 1, 5)
    out = to_uint8(grey)
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 128, 255, 255, 0]  # clamped to [-1, 1]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # grey repeated
    rgb = torch.stack([torch.full((2, 3), -1.0), torch.zeros(2, 3), torch.ones(2, 3)])
    assert to_uint8(rgb).shape == (2, 3, 3) and to_uint8(rgb)[0, 0].tolist() == [0, 128, 255]


def test_overlay_colours():
    img = torch.full((1, 6, 6), -1.0)  # black
    mask = torch.zeros(6, 6)
    mask[1:3, 1:3] = 1
    out = overlay(img, mask, color=(255, 40, 40), alpha=0.45)
    assert out.shape == (6, 6, 3) and out.dtype == np.uint8
    assert out[1, 1].tolist() == [115, 18, 18]  # 0.45 * (255, 40, 40), rounded
    assert out[0, 0].tolist() == [0, 0, 0] and out[5, 5].tolist() == [0, 0, 0]  # untouched outside the mask
    white = overlay(torch.ones(3, 6, 6), mask, color=(0, 0, 255), alpha=1.0)
    assert white[2, 2].tolist() == [0, 0, 255] and white[4, 4].tolist() == [255, 255, 255]


def test_overlay_reference_outline_is_green():
    img = torch.zeros(1, 9, 9)
    ref = torch.zeros(9, 9, dtype=torch.bool)
    ref[2:7, 2:7] = True
    out = overlay(img, torch.zeros(9, 9), reference=ref)
    green = (out == np.array([40, 255, 40])).all(-1)
    expected = np.zeros((9, 9), bool)
    expected[2:7, 2:7] = True
    expected[3:6, 3:6] = False  # only the outline, not the inside
    assert (green == expected).all()


def test_grid_layout():
    a = np.full((4, 5, 3), 10, np.uint8)
    b = np.full((4, 5, 3), 200, np.uint8)
    g = grid([[a, b, a], [b]], pad=2)
    assert g.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2, 3)
    assert g[2, 2].tolist() == [10, 10, 10] and g[2, 2 + 7].tolist() == [200, 200, 200]
    assert g[2 + 6, 2].tolist() == [200, 200, 200]
    assert g[2 + 6, 2 + 7].tolist() == [255, 255, 255]  # missing tiles stay white
    assert g[0, 0].tolist() == [255, 255, 255]  # padding is white


@pytest.mark.parametrize("upscale", [1, 3])
def test_save_png(tmp_path, upscale):
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)
    path = save_png(arr, tmp_path / "sub" / "x.png", upscale=upscale)
    assert path == tmp_path / "sub" / "x.png" and list(path.parent.iterdir()) == [path]  # no temporary left
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (6 * upscale, 4 * upscale)
        px = np.asarray(im.convert("RGB"))
    assert px[:upscale, :upscale].reshape(-1, 3).tolist() == [[255, 0, 0]] * upscale**2  # nearest-neighbour
