"""medhybrid.networks.nets: the EDM-preconditioned MONAI U-Net shared by every method."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_UNET as TINY

from medhybrid.core.config import ConfigError, validate
from medhybrid.networks import diffusion as D
from medhybrid.networks.nets import EDMPrecond, ModelConfig, build_network, mask_channels_for


def _net(image_channels: int = 3, num_classes: int = 2, cfg: ModelConfig = TINY, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    return build_network(cfg, image_channels, num_classes).eval()


def _x(b: int, c: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_mask_channels_for():
    assert mask_channels_for(2) == 1  # binary: one sigmoid channel
    assert mask_channels_for(3) == 3 and mask_channels_for(5) == 5  # one softmax channel per class


@pytest.mark.parametrize(("image_channels", "num_classes", "mask_channels"), [(1, 2, 1), (3, 2, 1), (3, 3, 3), (1, 4, 4)])
def test_output_shape(image_channels, num_classes, mask_channels):
    net = _net(image_channels, num_classes)
    assert (net.image_channels, net.mask_channels) == (image_channels, mask_channels)
    with torch.no_grad():
        out = net(_x(2, image_channels), torch.tensor([0.1, 2.0]))
        seg = net.segment(_x(2, image_channels))
    assert out.shape == (2, image_channels + mask_channels, 32, 32)
    assert seg.shape == (2, mask_channels, 32, 32)
    assert torch.isfinite(out).all()


def test_attention_level_builds_and_runs():
    net = _net(1, 2, ModelConfig(channels=(16, 32, 32), attention_levels=(False, False, True), num_head_channels=16))
    with torch.no_grad():
        assert net(_x(2, 1), 0.5).shape == (2, 2, 32, 32)


def test_eq7_preconditioning_identity():
    """Image channels = c_skip x + c_out F(c_in x; c_noise); mask channels = F's raw mask output."""
    net = _net(3)
    x, sigma = _x(3, 3), torch.tensor([0.01, 0.5, 20.0])
    s = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        out = net(x, sigma)
        f = net.backbone(D.c_in(s) * x, timesteps=D.c_noise(sigma) * net.noise_embed_scale)
    torch.testing.assert_close(out[:, :3], D.c_skip(s) * x + D.c_out(s) * f[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 3:], f[:, 3:])


def test_small_sigma_output_is_the_input():
    """As sigma -> 0, c_skip -> 1 and c_out -> 0: the denoised estimate of an (almost) clean image is itself."""
    net = _net(3)
    x = _x(2, 3)
    with torch.no_grad():
        out_small = net(x, 1e-5)[:, :3]
        out_large = net(x, 50.0)[:, :3]
    assert (out_small - x).abs().max().item() < 1e-3
    # at high noise the input is nearly ignored (c_skip(50) ~ 1e-4): the output is F's, not x
    assert (out_large - x).abs().mean().item() > 0.1


def test_sigma_forms_are_equivalent():
    net = _net(1)
    x = _x(2, 1)
    with torch.no_grad():
        a = net(x, 0.3)
        b = net(x, torch.tensor(0.3))
        c = net(x, torch.tensor([0.3, 0.3]))
        default = net(x)
        at_min = net(x, net.sigma_min)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(default, at_min)  # None means sigma_min
    # the conditioning matters: another sigma, another output
    with torch.no_grad():
        assert not torch.allclose(net(x, 2.0), a)


def test_segment_returns_mask_channels_at_sigma_min():
    net = _net(3, num_classes=3)
    x = _x(2, 3)
    with torch.no_grad():
        seg = net.segment(x)
        full = net(x, torch.full((2,), net.sigma_min))
    assert seg.shape == (2, 3, 32, 32)
    torch.testing.assert_close(seg, full[:, 3:])


def test_without_preconditioning_image_channels_are_raw_f():
    """MDM: the image channels are F's output for the clean-scaled input; the conditioning still follows sigma."""
    net = _net(1)
    x, sigma = _x(2, 1), torch.tensor([0.5, 5.0])
    with torch.no_grad():
        out = net(x, sigma, precondition=False)
        f = net.backbone(D.c_in(torch.tensor(net.sigma_min)) * x, timesteps=D.c_noise(sigma) * net.noise_embed_scale)
    torch.testing.assert_close(out, f)


def test_same_seed_same_weights_whatever_the_mode():
    a, b = _net(3, seed=7), _net(3, seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_config_validation_errors():
    with pytest.raises(ConfigError, match=r"attention_levels \(2\) must match channels \(3\)"):
        validate(ModelConfig, {"channels": [16, 32, 32], "attention_levels": [False, True]})
    with pytest.raises(ConfigError, match=r"channels \[24\] are not multiples of norm_num_groups=16"):
        validate(ModelConfig, {"channels": [16, 24, 32], "attention_levels": [False, False, False]})
    with pytest.raises(ConfigError, match="num_res_blocks"):
        validate(ModelConfig, {"num_res_blocks": 0})
    with pytest.raises(ConfigError, match="chanels: unknown key"):
        validate(ModelConfig, {"chanels": [16]})
    cfg = validate(ModelConfig, {"channels": [16, 32], "attention_levels": [False, False], "sigma_min": 0.01})
    assert cfg.edm.sigma_min == 0.01 and cfg.edm.sigma_data == 0.5
