"""medhybrid.workflows.sampling: joint (image, mask) samples from a hybrid model with EDM's Heun sampler."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_UNET as TINY
from PIL import Image

from medhybrid.cli import main
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.networks import diffusion as D
from medhybrid.networks.checkpoints import network_meta, save_model
from medhybrid.networks.nets import build_network
from medhybrid.workflows.sampling import sample_pairs, sample_to_grid

pytestmark = pytest.mark.usefixtures("workdir")


def _net(image_channels: int = 3, num_classes: int = 2):
    torch.manual_seed(0)
    return build_network(TINY, image_channels, num_classes)


def _checkpoint(folder, dataset_yaml, mode: str, resolution: int = 32):
    net = _net()
    meta = network_meta(net, TINY, Preprocess(resolution=resolution), load_dataset_spec(dataset_yaml), mode)
    return save_model(net, meta, folder / mode / "model.pt")


@pytest.mark.parametrize(("image_channels", "num_classes", "mask_channels"), [(3, 2, 1), (1, 3, 3)])
def test_sample_pairs_shapes_and_range(image_channels, num_classes, mask_channels):
    net = _net(image_channels, num_classes)
    images, masks = sample_pairs(net, 5, 16, steps=3, seed=0, batch_size=2)
    assert images.shape == (5, image_channels, 16, 16) and masks.shape == (5, mask_channels, 16, 16)
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert torch.isfinite(masks).all()
    assert not net.training  # sampling puts the network in eval mode


def test_sample_pairs_is_seeded():
    net = _net()
    a = sample_pairs(net, 2, 16, steps=3, seed=1)
    b = sample_pairs(net, 2, 16, steps=3, seed=1)
    c = sample_pairs(net, 2, 16, steps=3, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # batching does not change what is drawn: the latents come from one generator in order
    d = sample_pairs(net, 2, 16, steps=3, seed=1, batch_size=1)
    torch.testing.assert_close(d[0], a[0], atol=1e-5, rtol=0)


def test_sample_pairs_masks_are_read_from_the_sampled_images():
    net = _net()
    images, masks = sample_pairs(net, 2, 16, steps=3, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(masks, net.segment(images))


def test_sample_pairs_runs_heun_on_eq5_steps(monkeypatch):
    seen = {}

    def fake_heun(denoise, latents, sigmas):
        seen["sigmas"] = sigmas
        return torch.zeros_like(latents)

    monkeypatch.setattr(D, "heun_sample", fake_heun)
    net = _net()
    images, _ = sample_pairs(net, 1, 16, steps=5, sigma_max=10.0)
    torch.testing.assert_close(seen["sigmas"], D.sampling_sigmas(5, net.sigma_min, 10.0))
    assert torch.equal(images, torch.zeros(1, 3, 16, 16))


def test_sample_to_grid_png(isic_tiny, tmp_path):
    ckpt = _checkpoint(tmp_path, isic_tiny, "hybrid")
    out = sample_to_grid(ckpt, tmp_path / "grid.png", num=3, steps=3, per_row=2)
    assert out == tmp_path / "grid.png"
    # rows: 2 images, their overlays, 1 image, its overlay -> 4 rows x 2 columns of 32 px tiles, 2 px padding, x2
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (2 * (2 * 34 + 2), 2 * (4 * 34 + 2))


def test_sample_to_grid_diffusion_has_no_mask_rows(isic_tiny, tmp_path):
    ckpt = _checkpoint(tmp_path, isic_tiny, "diffusion")
    with Image.open(sample_to_grid(ckpt, tmp_path / "g.png", num=4, steps=2, per_row=4)) as im:
        assert im.size == (2 * (4 * 34 + 2), 2 * (1 * 34 + 2))


@pytest.mark.parametrize("mode", ["supervised", "mdm", "none"])
def test_sample_to_grid_rejects_non_diffusion_models(isic_tiny, tmp_path, mode):
    ckpt = _checkpoint(tmp_path, isic_tiny, mode)
    with pytest.raises(ValueError, match=f"a '{mode}' model is not a diffusion model"):
        sample_to_grid(ckpt, tmp_path / "x.png", num=2, steps=2)
    assert not (tmp_path / "x.png").exists()


def test_sample_cli(isic_tiny, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, isic_tiny, "hybrid")
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s.png"), "--num", "2", "--steps", "2"]) == 0
    assert f"samples written to {tmp_path / 's.png'}" in capsys.readouterr().out
    sup = _checkpoint(tmp_path, isic_tiny, "supervised")
    assert main(["sample", "--checkpoint", str(sup), "--out", str(tmp_path / "t.png"), "--num", "2", "--steps", "2"]) == 2
    assert "is not a diffusion model" in capsys.readouterr().err
