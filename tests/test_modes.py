"""medhybrid.networks.modes: each pretraining mode one registered object (corruption, objective, what it needs)."""

from __future__ import annotations

import pytest
import torch

from medhybrid.engines.batches import CorruptionPrepareBatch, step_generator
from medhybrid.engines.losses import PretrainLoss
from medhybrid.networks import diffusion as D
from medhybrid.networks import modes
from medhybrid.networks.modes import PretrainMode, get_mode, mode_names, register


def test_the_five_modes_are_registered_with_what_they_need():
    assert set(mode_names()) >= {"hybrid", "supervised", "diffusion", "mdm", "none"}
    learns = {m for m in mode_names() if get_mode(m).learns_masks}
    unlabelled = {m for m in mode_names() if get_mode(m).reads_unlabelled}
    assert {"hybrid", "supervised"} <= learns and not learns & {"diffusion", "mdm", "none"}
    assert {"hybrid", "diffusion", "mdm"} <= unlabelled and not unlabelled & {"supervised", "none"}
    assert not get_mode("none").trains
    with pytest.raises(ValueError, match="unknown pretraining mode 'noise'; known: hybrid"):
        get_mode("noise")


@pytest.mark.parametrize("name", ["hybrid", "supervised", "diffusion", "mdm"])
def test_corruption_and_objective(name):
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    label = (x0[:, :1] > 0).float()
    prep = CorruptionPrepareBatch(name, seg_fraction=0.5, weighting="cskip", mdm_patch=4)
    x, targets, _, kw = prep({"image": x0, "label": label})
    assert x.shape == x0.shape and kw["sigma"].shape == (4,)
    if name == "supervised":
        assert torch.equal(x, x0) and torch.all(kw["sigma"] == D.EDMParams().sigma_min)
    if name == "mdm":
        assert kw["precondition"] is False and ((x == 0) | (x == x0)).all()
    assert ("mask_weight" in targets) == (name == "hybrid")
    loss = PretrainLoss(name, 1)
    pred = torch.cat([x0 + 0.1, label * 4 - 2], dim=1)
    value = loss(pred, targets)
    assert value.ndim == 0 and torch.isfinite(value)
    assert set(loss.terms) == {"hybrid": {"denoise_loss", "mask_loss"}, "supervised": {"mask_loss"},
                               "diffusion": {"denoise_loss"}, "mdm": {"ssim_loss"}}[name]


def test_a_new_mode_is_one_registered_class():
    """A mode that denoises at one fixed noise level: one class, and the prepare-batch and loss use it by name."""

    @register
    class FixedLevel(PretrainMode):
        name = "fixed-level-test"
        reads_unlabelled = True

        def corrupt(self, prep, x0, labelled, g):
            sigma = torch.full((x0.shape[0],), 0.3)
            return x0 + 0.3 * torch.randn(x0.shape, generator=g), sigma, {}, {}

        def objective(self, loss, img, logits, x0, target):
            den = self._denoise_term(loss, img, x0, target)
            return den, {"denoise_loss": den.mean()}

    try:
        x0 = torch.zeros(2, 1, 8, 8)
        prep = CorruptionPrepareBatch("fixed-level-test")
        x, targets, _, kw = prep({"image": x0})
        expected = 0.3 * torch.randn(x0.shape, generator=step_generator(0, 0))
        assert torch.equal(x, expected) and torch.all(kw["sigma"] == 0.3)
        assert PretrainLoss("fixed-level-test")(torch.cat([x0, x0[:, :1]], 1), targets) == 0
    finally:
        modes._REGISTRY.unregister("fixed-level-test")
