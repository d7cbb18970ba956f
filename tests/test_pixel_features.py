"""medhybrid.experiments.pixel_features: DDPM pixel features of a frozen U-Net + MLP ensemble (Baranchuk et al. 2022)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_UNET as TINY
from conftest import mlflow_client, ph2_yaml

from medhybrid.core.config import ConfigError, validate
from medhybrid.data.datasets import load_pairs
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.data.transforms import IGNORE_INDEX, preprocessing
from medhybrid.experiments.pixel_features import (
    EnsembleConfig,
    FeatureConfig,
    MLPEnsemble,
    PixelFeatures,
    PixelFeaturesConfig,
    load_feature_segmenter,
    majority_vote,
    run_pixel_features,
    train_ensemble,
    training_pixels,
    vote_entropy,
)
from medhybrid.networks.nets import build_network
from medhybrid.workflows.evaluate import evaluate


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return build_network(TINY, 3, 2)


# --------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize(("blocks", "per_level"), [(None, 32 + 32 + 16), ((1, 2), 32 + 16), ((2,), 16)])
def test_feature_shape_is_levels_times_block_channels(tiny_net, blocks, per_level):
    ext = PixelFeatures(tiny_net, FeatureConfig(sigmas=(0.2, 0.5, 1.0), blocks=blocks))
    f = ext(torch.randn(2, 3, 32, 32))
    assert f.shape == (2, 3 * per_level, 32, 32)  # every block upsampled to the image size
    assert torch.isfinite(f).all() and f.std() > 0


def test_features_are_fixed_per_image(tiny_net):
    """The noise is fixed: an image gets the same features alone, in a batch, or from a fresh extractor."""
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    a = PixelFeatures(tiny_net, FeatureConfig(noise_seed=7))(x)
    b = PixelFeatures(tiny_net, FeatureConfig(noise_seed=7))(x[1:2])
    torch.testing.assert_close(a[1:2], b, rtol=1e-4, atol=1e-5)
    c = PixelFeatures(tiny_net, FeatureConfig(noise_seed=8))(x[1:2])
    assert not torch.allclose(b, c, atol=1e-3)


def test_extractor_leaves_the_network_frozen_and_unhooked(tiny_net):
    ext = PixelFeatures(tiny_net, FeatureConfig(sigmas=(0.5,)))
    ext(torch.randn(1, 3, 32, 32))
    assert not any(p.requires_grad for p in tiny_net.parameters())
    assert all(not b._forward_hooks for b in tiny_net.backbone.up_blocks)


def test_bad_blocks_and_sigmas_are_refused(tiny_net):
    with pytest.raises(ValueError, match=r"feature blocks \[5\] do not exist: the backbone has 3 decoder blocks"):
        PixelFeatures(tiny_net, FeatureConfig(blocks=(0, 5)))
    with pytest.raises(ValueError, match="positive noise levels"):
        FeatureConfig(sigmas=(0.2, 0.0))


def test_training_pixels_drop_ignored_and_subsample(tiny_net):
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    y[:, :, :8] = IGNORE_INDEX
    y[:, :, 20:] = 1
    ext = PixelFeatures(tiny_net, FeatureConfig(sigmas=(0.5,), chunk=1))
    f, lab = training_pixels(ext, x, y, max_pixels=10_000)
    assert f.shape == (2 * 24 * 32, 80) and f.dtype == torch.float16  # ignored rows dropped, nothing else
    assert lab.tolist().count(1) == 2 * 12 * 32 and IGNORE_INDEX not in lab.tolist()
    f, lab = training_pixels(ext, x, y, max_pixels=100)
    assert f.shape == (100, 80) and lab.shape == (100,)


# --------------------------------------------------------------------------------------------- ensemble
def test_majority_vote_and_vote_entropy():
    votes = torch.tensor([[10.0, 0.0], [4.0, 6.0], [5.0, 5.0], [0.0, 10.0]])
    assert majority_vote(votes).tolist() == [0, 1, 0, 1]  # a tie goes to the lower class
    h = vote_entropy(votes)
    p = 0.4
    assert h.tolist() == pytest.approx([0.0, -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2), 1.0, 0.0])


def test_ensemble_votes_sum_to_members_and_learn_a_separable_task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).long()
    cfg = EnsembleConfig(members=3, hidden=(32, 16), max_epochs=15, batch_size=128)
    ens, hist = train_ensemble(x, y, 2, cfg, seed=0)
    assert len(ens.members) == 3 and len(hist) == 3
    assert all(h["loss"][-1] < h["loss"][0] for h in hist)
    v = ens.votes(x)
    assert v.shape == (2000, 2) and torch.all(v.sum(1) == 3)
    assert (majority_vote(v) == y).float().mean() > 0.95
    # members differ (own seeds), so the ensemble is not one model three times
    w = [m[0].weight for m in ens.members]
    assert not torch.equal(w[0], w[1])


def test_early_stopping_stops_when_loss_plateaus():
    x = torch.randn(256, 4)
    y = torch.zeros(256, dtype=torch.long)  # trivial: loss collapses, then stops improving
    _, hist = train_ensemble(x, y, 2, EnsembleConfig(members=1, max_epochs=200, patience=2, min_delta=0.5, batch_size=64))
    assert hist[0]["epochs"] < 200


def test_train_ensemble_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="5 feature rows but 4 labels"):
        train_ensemble(torch.randn(5, 3), torch.zeros(4, dtype=torch.long), 2, EnsembleConfig(members=1))
    assert isinstance(MLPEnsemble(8, 3, members=2).members[0][-1], torch.nn.Linear)


# --------------------------------------------------------------------------------------------- runner, real images
def test_config_refuses_a_source_dataset_or_a_missing_checkpoint(workdir, isic_tiny, tmp_path):
    with pytest.raises(ConfigError, match="source dataset"):
        validate(PixelFeaturesConfig, {"dataset": str(isic_tiny), "init": __file__})
    with pytest.raises(ConfigError, match="pretrained checkpoint .*nope.pt not found"):
        validate(PixelFeaturesConfig, {"dataset": "ph2", "init": str(tmp_path / "nope.pt")})


def test_diffusion_features_beat_a_majority_class_predictor_on_ph2(pretrain_cfg, isic_tiny, workdir, mlflow_uri):
    """Diffusion-pretrained tiny U-Net on 16 ISIC images, features + 5 MLPs from 2 PH2 labels, scored on 8 PH2 test
    images: above the all-background predictor in pixel accuracy, and Dice well above it (which scores 0)."""
    from medhybrid.workflows.pretrain import run_pretraining

    pre = run_pretraining(pretrain_cfg(isic_tiny, "diffusion", out="pre"))
    target = ph2_yaml(workdir / "datasets", n_pool=8, n_test=8)
    cfg = validate(PixelFeaturesConfig, {
        "dataset": str(target), "init": str(pre.checkpoint), "budget": 2, "seed": 0, "output_dir": str(workdir / "pf"),
        "ensemble": {"members": 5, "max_pixels": 4000, "max_epochs": 8}, "mlflow": {"tracking_uri": mlflow_uri},
        "tags": {"ablation": "t"}})
    res = run_pixel_features(cfg)
    assert res.stats["pixels"] == 2 * 32 * 24  # 287x384 padded to 32x32: the 8 padding rows are ignored, not trained on
    assert res.stats["n_features"] == 3 * (32 + 32 + 16)

    seg, meta = load_feature_segmenter(res.checkpoint)  # weights_only load
    assert meta["budget"] == 2 and meta["init"] == str(pre.checkpoint.resolve())
    spec = load_dataset_spec(target)
    pre_t = preprocessing(spec, Preprocess(**meta["preprocess"]))
    test = [pre_t(p) for p in load_pairs(spec, "test")]
    x = torch.stack([torch.as_tensor(d["image"]) for d in test])
    y = torch.stack([torch.as_tensor(d["label"]) for d in test])
    pred = (seg.segment(x) > 0).long()
    valid = y != IGNORE_INDEX
    acc = (pred == y)[valid].float().mean()
    majority = max((y[valid] == 0).float().mean(), (y[valid] == 1).float().mean())
    assert acc > majority + 0.05, (float(acc), float(majority))
    ev = evaluate(seg, spec, Preprocess(**meta["preprocess"]), "test")
    assert ev.summary["test_dice"] > 0.5 and ev.summary["test_images"] == 8

    u = seg.uncertainty(x[:2])
    assert u.shape == (2, 1, 32, 32) and float(u.min()) >= 0 and float(u.max()) <= 1

    run = mlflow_client(mlflow_uri).get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("method", "budget", "seed", "ablation")} == \
        {"method": "ddpm-features", "budget": "2", "seed": "0", "ablation": "t"}
    assert run.data.metrics["pixel_n_features"] == 240
    again = run_pixel_features(cfg)  # finished: returned as is, no new run
    assert again.run_id == res.run_id and again.checkpoint.stat().st_mtime == res.checkpoint.stat().st_mtime
