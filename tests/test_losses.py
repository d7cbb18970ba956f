"""medhybrid.engines.losses: EDM denoising loss, masked segmentation loss and the per-mode pretraining objective."""

from __future__ import annotations

import pytest
import torch

from medhybrid.data.transforms import IGNORE_INDEX
from medhybrid.engines.losses import FinetuneLoss, PretrainLoss, SegmentationLoss, denoising_loss
from medhybrid.networks import diffusion as D


def _label(b: int = 2, size: int = 16, seed: int = 0, classes: int = 2) -> torch.Tensor:
    """(B, 1, H, W) class indices with a square of IGNORE_INDEX pixels."""
    lab = torch.randint(0, classes, (b, 1, size, size), generator=torch.Generator().manual_seed(seed)).float()
    lab[:, :, 2:6, 3:9] = IGNORE_INDEX
    return lab


def _perfect_logits(label: torch.Tensor, channels: int, scale: float = 8.0) -> torch.Tensor:
    lab = label.clamp(min=0).long()[:, 0]
    if channels == 1:
        return (lab.float() * 2 - 1).unsqueeze(1) * scale
    return (torch.nn.functional.one_hot(lab, channels).permute(0, 3, 1, 2).float() * 2 - 1) * scale


# --------------------------------------------------------------------------------------------- denoising
def test_denoising_loss_is_lambda_times_mse():
    g = torch.Generator().manual_seed(0)
    clean, den = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    sigma = torch.tensor([0.01, 0.5, 10.0])
    loss = denoising_loss(den, clean, sigma)
    assert loss.shape == (3,)
    mse = ((den - clean) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, D.loss_weight(sigma) * mse)
    torch.testing.assert_close(loss, mse / D.c_out(sigma) ** 2)
    assert torch.equal(denoising_loss(clean, clean, sigma), torch.zeros(3))


def test_denoising_loss_sigma_data():
    clean = torch.zeros(1, 1, 4, 4)
    den = torch.ones(1, 1, 4, 4)
    sigma = torch.tensor([1.0])
    assert denoising_loss(den, clean, sigma, sigma_data=1.0).item() == pytest.approx(2.0)  # (1 + 1) / 1
    assert denoising_loss(den, clean, sigma, sigma_data=0.5).item() == pytest.approx(5.0)  # 1.25 / 0.25


# --------------------------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize(("channels", "classes"), [(1, 2), (3, 3)])
def test_segmentation_loss_ignores_ignored_pixels(channels, classes):
    loss = SegmentationLoss(channels)
    lab = _label(classes=classes)
    logits = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(1))
    changed = logits.clone()
    changed[:, :, 2:6, 3:9] = torch.randn(2, channels, 4, 6) * 50  # only the ignored pixels change
    a, b = loss(logits, lab), loss(changed, lab)
    assert a.shape == (2,)
    torch.testing.assert_close(a, b)
    # the same change on labelled pixels does change the loss
    other = logits.clone()
    other[:, 0, 10:14, 3:9] += 50  # one channel: changes sigmoid and softmax alike
    assert not torch.allclose(loss(other, lab), a)


@pytest.mark.parametrize(("channels", "classes"), [(1, 2), (3, 3)])
def test_segmentation_loss_perfect_below_wrong(channels, classes):
    loss = SegmentationLoss(channels)
    lab = _label(classes=classes)
    perfect = _perfect_logits(lab, channels)
    wrong = _perfect_logits((lab.clamp(min=0) + 1) % classes, channels)
    lp, lw, lr = loss(perfect, lab), loss(wrong, lab), loss(torch.zeros_like(perfect), lab)
    assert bool((lp < 0.01).all())  # dice ~0 and cross-entropy ~0
    assert bool((lp < lr).all()) and bool((lr < lw).all())


def test_segmentation_loss_all_ignored_is_finite():
    loss = SegmentationLoss(1)
    lab = torch.full((1, 1, 8, 8), IGNORE_INDEX)
    out = loss(torch.randn(1, 1, 8, 8), lab)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- pretraining objective
def _batch(c: int = 3, b: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, c, 16, 16, generator=g) * 2 - 1
    target = {"image": x0, "label": _label(b), "sigma": torch.tensor([0.005, 0.05, 0.5, 5.0])[:b]}
    pred = torch.cat([x0 + 0.1 * torch.randn(b, c, 16, 16, generator=g), torch.randn(b, 1, 16, 16, generator=g)], 1)
    return pred, target


def test_pretrain_loss_hybrid_terms():
    pred, t = _batch()
    t["mask_weight"] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    t["denoise_weight"] = 0.5
    fn = PretrainLoss("hybrid", 1)
    total = fn(pred, t)
    den = denoising_loss(pred[:, :3], t["image"], t["sigma"]) * 0.5
    seg = SegmentationLoss(1)(pred[:, 3:], t["label"])
    assert total.item() == pytest.approx((den + t["mask_weight"] * seg).mean().item(), rel=1e-5)
    assert set(fn.terms) == {"denoise_loss", "mask_loss"}
    assert fn.terms["denoise_loss"] == pytest.approx(den.mean().item(), rel=1e-5)
    assert fn.terms["mask_loss"] == pytest.approx(seg.mean().item(), rel=1e-5)  # logged unweighted
    # zero mask weight everywhere: only the denoising term is left
    t["mask_weight"] = torch.zeros(4)
    assert fn(pred, t).item() == pytest.approx(den.mean().item(), rel=1e-5)


def test_pretrain_loss_supervised_is_the_mask_term():
    pred, t = _batch()
    fn = PretrainLoss("supervised", 1)
    total = fn(pred, t)
    assert set(fn.terms) == {"mask_loss"}
    assert total.item() == pytest.approx(SegmentationLoss(1)(pred[:, 3:], t["label"]).mean().item(), rel=1e-5)
    # the image channels play no part
    pred2 = pred.clone()
    pred2[:, :3] = 100.0
    assert fn(pred2, t).item() == pytest.approx(total.item())


def test_finetune_loss_equals_supervised_pretraining_loss():
    """Fine-tuning's loss is supervised pretraining's objective on a label tensor (no target dict): same value, same
    gradient, the image channels ignored."""
    pred, t = _batch()
    a, b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    sup, fin = PretrainLoss("supervised", 1)(a, t), FinetuneLoss(3, 1)
    tuned = fin(b, t["label"])
    assert torch.equal(tuned, sup) and fin.terms == {"mask_loss": pytest.approx(sup.item())}
    sup.backward()
    tuned.backward()
    assert torch.equal(a.grad, b.grad) and not b.grad[:, :3].any()


def test_pretrain_loss_diffusion_ignores_labels():
    pred, t = _batch()
    fn = PretrainLoss("diffusion", 1)
    total = fn(pred, t)
    assert set(fn.terms) == {"denoise_loss"}
    assert total.item() == pytest.approx(denoising_loss(pred[:, :3], t["image"], t["sigma"]).mean().item(), rel=1e-5)
    t["label"] = None  # unlabelled data is fine
    assert fn(pred, t).item() == pytest.approx(total.item())


def test_pretrain_loss_mdm_is_one_minus_ssim():
    pred, t = _batch()
    fn = PretrainLoss("mdm", 1)
    noisy = fn(pred, t)
    assert set(fn.terms) == {"ssim_loss"}
    assert 0.0 < noisy.item() < 1.0
    exact = pred.clone()
    exact[:, :3] = t["image"]
    assert fn(exact, t).item() == pytest.approx(0.0, abs=1e-4)  # SSIM(x, x) = 1
    worse = pred.clone()
    worse[:, :3] = t["image"] + 0.5 * torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    assert fn(worse, t).item() > noisy.item()


def test_pretrain_loss_grey_images():
    pred, t = _batch(c=1)
    fn = PretrainLoss("hybrid", 1)
    t["mask_weight"] = torch.ones(4)
    total = fn(pred, t)
    assert torch.isfinite(total) and set(fn.terms) == {"denoise_loss", "mask_loss"}
