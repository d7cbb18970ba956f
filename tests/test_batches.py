"""medhybrid.engines.batches (prepare-batch seams and samplers), medhybrid.networks.inferers and medhybrid.engines.metrics."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from medhybrid.data.transforms import IGNORE_INDEX
from medhybrid.engines.batches import (
    CorruptionPrepareBatch,
    EpochSeededSampler,
    LevelsPrepareBatch,
    SegmentationPrepareBatch,
    step_generator,
)
from medhybrid.networks import diffusion as D

EDM = D.EDMParams()


def _batch(b: int = 8, c: int = 3, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, c, size, size, generator=g) * 1.5 + 0.25  # never 0, so masked pixels show as exact zeros
    label = (torch.rand(b, 1, size, size, generator=g) > 0.5).float()
    label[:, :, :4] = IGNORE_INDEX
    return {"image": image, "label": label}


# --------------------------------------------------------------------------------------------- corruption per mode
def test_step_generator_depends_on_seed_step_rank():
    def draw(*a):
        return torch.rand(4, generator=step_generator(*a))

    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(1, 5, 0))


def test_supervised_feeds_clean_image_at_sigma_min():
    batch = _batch()
    x, t, args, kw = CorruptionPrepareBatch("supervised", EDM)(batch)
    assert torch.equal(x, batch["image"]) and torch.equal(t["image"], batch["image"]) and torch.equal(t["label"], batch["label"])
    assert args == () and set(kw) == {"sigma"}
    assert torch.equal(kw["sigma"], torch.full((8,), EDM.sigma_min)) and torch.equal(t["sigma"], kw["sigma"])
    assert "mask_weight" not in t


def test_diffusion_adds_gaussian_noise_at_lognormal_sigma():
    batch = _batch(b=64, size=32)
    prep = CorruptionPrepareBatch("diffusion", EDM, seed=3)
    prep.step = 11
    x, t, _, kw = prep(batch)
    sigma = kw["sigma"]
    assert sigma.shape == (64,) and torch.equal(t["sigma"], sigma) and "mask_weight" not in t
    assert "precondition" not in kw
    noise = (x - batch["image"]) / sigma.view(-1, 1, 1, 1)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.std().item() == pytest.approx(1.0, abs=0.01)
    assert sigma.log().mean().item() == pytest.approx(EDM.p_mean, abs=0.5)  # 64 draws of N(-1.2, 1.2^2)


def test_hybrid_low_band_share_and_low_weighting():
    batch = _batch(b=8)
    prep = CorruptionPrepareBatch("hybrid", EDM, seed=0, mask_weight=2.0, seg_fraction=0.5, seg_sigma_max=0.1, weighting="low")
    weights = []
    for step in range(1, 41):
        prep.step = step
        _, t, _, kw = prep(batch)
        sigma, w = kw["sigma"], t["mask_weight"]
        low = sigma[:4]  # round(0.5 * 8) samples drawn log-uniform in [sigma_min, seg_sigma_max]
        assert bool((low >= EDM.sigma_min * (1 - 1e-5)).all()) and bool((low <= 0.1 * (1 + 1e-5)).all())
        assert torch.equal(w, torch.where(sigma <= 0.1 * (1 + 1e-6), 2.0, 0.0))  # zero above seg_sigma_max
        weights.append(w)
    w = torch.cat(weights)
    # the log-normal half sometimes lands in the band too (P(sigma <= 0.1) ~ 0.18), never the mask weight's cap
    share = (w > 0).float().mean().item()
    assert 0.5 <= share < 0.75


def test_hybrid_weightings():
    batch = _batch(b=8)
    for weighting, expected in (("all", lambda s: torch.full_like(s, 0.5)),
                                ("cskip", lambda s: 0.5 * D.c_skip(s, EDM.sigma_data))):
        prep = CorruptionPrepareBatch("hybrid", EDM, mask_weight=0.5, seg_fraction=0.0, weighting=weighting)
        _, t, _, kw = prep(batch)
        torch.testing.assert_close(t["mask_weight"], expected(kw["sigma"]))


def test_hybrid_without_seg_fraction_is_all_lognormal():
    batch = _batch(b=8)
    a = CorruptionPrepareBatch("hybrid", EDM, seed=1, seg_fraction=0.0)
    b = CorruptionPrepareBatch("diffusion", EDM, seed=1)
    xa, _, _, ka = a(batch)
    xb, _, _, kb = b(batch)
    assert torch.equal(ka["sigma"], kb["sigma"]) and torch.equal(xa, xb)  # the naive hybrid noises like diffusion


def test_mdm_masks_patches_without_preconditioning():
    batch = _batch(b=16)
    prep = CorruptionPrepareBatch("mdm", EDM, seed=0, mdm_patch=8)
    x, t, _, kw = prep(batch)
    assert kw["precondition"] is False
    masked = x == 0
    assert torch.equal(x[~masked], batch["image"][~masked])  # visible pixels untouched
    assert torch.equal(masked, masked[:, :1].expand_as(masked))  # same mask across channels
    frac = masked[:, 0].float().mean(dim=(1, 2))
    # the conditioning sigma encodes the mask ratio (log-linear in sigma), and the masked share follows it
    ratio = (kw["sigma"].log() - math.log(EDM.sigma_min)) / (math.log(EDM.sigma_max) - math.log(EDM.sigma_min))
    torch.testing.assert_close(frac, (ratio * 16).round() / 16, atol=1e-6, rtol=0)
    assert "mask_weight" not in t


@pytest.mark.parametrize("mode", ["hybrid", "diffusion", "mdm"])
def test_corruption_is_a_function_of_seed_step_rank(mode):
    batch = _batch(b=4)

    def run(seed=0, step=1, rank=0):
        p = CorruptionPrepareBatch(mode, EDM, seed=seed, rank=rank, seg_fraction=0.5)
        p.step = step
        x, _, _, kw = p(batch)
        return x, kw["sigma"]

    x1, s1 = run()
    x1b, s1b = run()
    assert torch.equal(x1, x1b) and torch.equal(s1, s1b)
    for other in (run(step=2), run(rank=1), run(seed=1)):
        assert not torch.equal(x1, other[0])


def test_attach_follows_engine_iteration():
    prep = CorruptionPrepareBatch("diffusion", EDM, seed=0)
    batch = _batch(b=2, size=8)
    seen = []

    def step(engine, _):
        x, _, _, kw = prep(batch)
        seen.append((prep.step, x))

    engine = Engine(step)
    prep.attach(engine)
    engine.run([0, 1, 2], max_epochs=2)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6]
    # iteration 4 of a fresh preparer (as after a resume) gives exactly the same corruption
    fresh = CorruptionPrepareBatch("diffusion", EDM, seed=0)
    fresh.step = 4
    assert torch.equal(fresh(batch)[0], seen[3][1])


def test_segmentation_prepare_batch():
    batch = _batch(b=2)
    x, y, args, kw = SegmentationPrepareBatch()(batch)
    assert args == () and kw == {}  # no conditioning: the network feeds it at sigma_min
    assert torch.equal(x, batch["image"]) and torch.equal(y, batch["label"])
    x, y, _, _ = SegmentationPrepareBatch()({"image": batch["image"]})
    assert y is None


# --------------------------------------------------------------------------------------------- validation levels
@pytest.mark.parametrize("mode", ["diffusion", "mdm"])
def test_levels_prepare_batch(mode):
    levels = [0.25, 0.5, 0.75]
    batch = _batch(b=4)
    lp = LevelsPrepareBatch(mode, levels, EDM, seed=1234)
    x, t, _, kw = lp(batch)
    assert x.shape == (12, 3, 32, 32) and torch.equal(t["image"], batch["image"].repeat(3, 1, 1, 1))
    assert t["level_index"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    if mode == "mdm":
        assert kw["precondition"] is False
        frac = (x == 0)[:, 0].float().mean(dim=(1, 2))
        assert frac.tolist() == pytest.approx([0.25] * 4 + [0.5] * 4 + [0.75] * 4)
        torch.testing.assert_close(kw["sigma"], D.mdm_sigma(torch.tensor(levels).repeat_interleave(4), EDM))
    else:
        assert kw["sigma"].tolist() == pytest.approx([0.25] * 4 + [0.5] * 4 + [0.75] * 4)
        noise = (x - t["image"]) / kw["sigma"].view(-1, 1, 1, 1)
        assert noise.std().item() == pytest.approx(1.0, abs=0.02)
    # fixed per batch index: a second epoch sees the same corruption
    again = LevelsPrepareBatch(mode, levels, EDM, seed=1234)(batch)[0]
    assert torch.equal(x, again)
    lp.batch_index = 1
    assert not torch.equal(lp(batch)[0], x)


# --------------------------------------------------------------------------------------------- sampler and clipping
def test_epoch_seeded_sampler_order():
    s = EpochSeededSampler(100, 20, seed=0)
    a = list(s)
    assert len(a) == len(s) == 20 and len(set(a)) == 20 and all(0 <= i < 100 for i in a)
    assert list(s) == a  # same epoch, same order
    s.set_epoch(1)
    b = list(s)
    assert b != a
    again = EpochSeededSampler(100, 20, seed=0)
    again.set_epoch(1)
    assert list(again) == b  # a new sampler (a resumed run) at that epoch gives the same order
    other_seed = EpochSeededSampler(100, 20, seed=1)
    other_seed.set_epoch(1)
    assert list(other_seed) != b


def test_epoch_seeded_sampler_ranks_are_disjoint():
    world = 3
    parts = [list(EpochSeededSampler(50, 10, seed=0, rank=r, world_size=world)) for r in range(world)]
    assert all(len(p) == 10 for p in parts)
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == 30  # no image on two ranks in one epoch
    single = list(EpochSeededSampler(50, 30, seed=0))
    assert sorted(flat) == sorted(single)  # the ranks split what one process would have drawn


def test_epoch_seeded_sampler_with_replacement():
    s = EpochSeededSampler(7, 20, seed=0)
    idx = list(s)
    assert len(idx) == 20 and set(idx) == set(range(7))
    counts = torch.bincount(torch.tensor(idx), minlength=7)
    assert counts.min().item() >= 2 and counts.max().item() <= 3  # whole permutations, then a cut
    parts = [list(EpochSeededSampler(7, 10, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert all(len(p) == 10 for p in parts)


def test_epoch_seeded_sampler_attach():
    s = EpochSeededSampler(10, 4, seed=0)
    epochs = []
    engine = Engine(lambda e, b: None)
    s.attach(engine)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(s.epoch))
    engine.run([0], max_epochs=3)
    assert epochs == [1, 2, 3]
