"""medhybrid.engines.semi: the papers' math (ramp-up, consistency, confident pseudo-labels), the prepare-batch seams on real
PH2 images (which rows are labelled, what the unlabelled rows carry), that no unlabelled or test image ever reaches the
mask loss, and that a killed semi-supervised fine-tune resumes to the same weights."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import PH2, real_split
from test_finetune import _ft_cfg

from medhybrid.core.config import validate
from medhybrid.data.datasets import few_shot_pairs
from medhybrid.data.transforms import IGNORE_INDEX
from medhybrid.engines import semi as S
from medhybrid.engines.batches import MixedBatchSampler
from medhybrid.networks.checkpoints import load_model
from medhybrid.workflows.finetune import FinetuneConfig, initial_network, run_finetuning, semi_training, unlabelled_items

pytestmark = pytest.mark.usefixtures("workdir")


# --------------------------------------------------------------------------------------------- the papers' math
def test_sigmoid_rampup_follows_laine_and_aila():
    assert S.sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert S.sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert S.sigmoid_rampup(10, 10) == 1.0 and S.sigmoid_rampup(50, 10) == 1.0
    assert S.sigmoid_rampup(0, 0) == 1.0  # no ramp-up


def test_consistency_is_the_squared_difference_of_probabilities():
    logits = torch.tensor([[[[0.0, 2.0]]]])  # (1, 1, 1, 2)
    teacher = torch.tensor([[[[0.5, 0.5]]]])
    expected = ((0.5 - 0.5) ** 2 + (torch.sigmoid(torch.tensor(2.0)).item() - 0.5) ** 2) / 2
    assert S.consistency_loss(logits, teacher).item() == pytest.approx(expected)
    assert S.consistency_loss(logits, S.probabilities(logits)).item() == 0.0


def test_pseudo_labels_below_the_threshold_count_as_zero_not_dropped():
    student = torch.zeros(1, 1, 1, 4)  # p = 0.5 everywhere: BCE = ln 2 against either hard label
    teacher = torch.tensor([[[[0.99, 0.01, 0.6, 0.97]]]])  # confidences 0.99, 0.99, 0.6, 0.97
    loss = S.confident_pseudo_label_loss(student, teacher, threshold=0.95)
    assert loss.item() == pytest.approx(3 * math.log(2) / 4)  # 3 confident pixels, averaged over all 4
    assert S.confident_pseudo_label_loss(student, teacher, threshold=1.0).item() == 0.0
    # several classes: softmax confidence, cross-entropy against the argmax
    logits = torch.zeros(1, 3, 1, 2)
    q = torch.tensor([[[[0.96, 0.2]], [[0.02, 0.5]], [[0.02, 0.3]]]])
    assert S.confident_pseudo_label_loss(logits, q, 0.95).item() == pytest.approx(math.log(3) / 2)


def test_loss_keeps_unlabelled_rows_out_of_the_mask_loss():
    """The mask loss's gradient never reaches an unlabelled row, and its value is the labelled rows' mean."""
    torch.manual_seed(0)
    pred = torch.randn(4, 4, 8, 8, requires_grad=True)  # 3 image channels + 1 mask channel
    label = torch.randint(0, 2, (4, 1, 8, 8)).float()
    label[2:] = IGNORE_INDEX
    labelled = torch.tensor([1.0, 1.0, 0.0, 0.0])
    target = {"label": label, "labelled": labelled, "teacher_probs": torch.rand(4, 1, 8, 8), "weight": 0.0}
    for algorithm in ("mean-teacher", "fixmatch"):
        loss = S.SemiSupervisedLoss(algorithm, image_channels=3)
        out = loss(pred, target)
        (g,) = torch.autograd.grad(out, pred)
        assert g[2:].abs().sum() == 0 and g[:2, 3:].abs().sum() > 0
        assert out.item() == pytest.approx(loss.seg(pred[:2, 3:], label[:2]).mean().item(), rel=1e-5)
    # with weight 1, fixmatch's term reaches the unlabelled rows' mask channel only
    target["weight"] = 1.0
    target["teacher_probs"] = torch.ones(4, 1, 8, 8)
    (g,) = torch.autograd.grad(S.SemiSupervisedLoss("fixmatch", 3)(pred, target), pred)
    assert g[2:, 3:].abs().sum() > 0 and g[2:, :3].abs().sum() == 0
    with pytest.raises(ValueError, match="denoise needs"):
        S.SemiSupervisedLoss("denoise", image_channels=0)


def test_strong_view_is_a_photometric_copy_with_a_cutout_box():
    aug = S.strong_augmentation(S.StrongAugmentConfig(prob=1.0, cutout=0.5), resolution=32)
    aug.set_random_state(seed=0)
    x = torch.linspace(-0.9, 0.9, 32 * 32).view(1, 32, 32)
    out = aug({"image": x.clone()})
    assert torch.equal(out["image"], x)  # the weak view is untouched
    strong = torch.as_tensor(out[S.STRONG_KEY])
    assert strong.shape == x.shape and not torch.allclose(strong, x)
    assert (strong == 0).sum() >= 1  # the Cutout box, mid-grey
    assert (strong == 0).sum() <= 16 * 16


# --------------------------------------------------------------------------------------------- real images
def _semi_cfg(ph2_tiny, workdir, mlflow_uri, algorithm, **kw):
    return _ft_cfg(ph2_tiny, workdir, mlflow_uri, semi={"algorithm": algorithm, "unlabelled_batch": 3}, **kw)


def test_unlabelled_images_are_the_pool_outside_the_subset_never_test(ph2_tiny, workdir, mlflow_uri):
    cfg = _semi_cfg(ph2_tiny, workdir, mlflow_uri, "fixmatch", unlabelled_exclude=[real_split(PH2)["pool"][7]])
    pairs = few_shot_pairs(cfg.dataset, cfg.budget, cfg.seed)
    ids = [p["id"] for p in pairs]
    items = unlabelled_items(cfg, ids)
    pool, test = real_split(PH2)["pool"][:8], real_split(PH2)["test"]
    got = [it["id"] for it in items]
    assert sorted(got) == sorted(set(pool) - set(ids) - {pool[7]}) and len(got) == 5
    assert not set(got) & set(test) and all("label" not in it for it in items)


@pytest.mark.parametrize("algorithm", ["mean-teacher", "fixmatch", "denoise"])
def test_prepared_batches_on_real_images(ph2_tiny, workdir, mlflow_uri, algorithm):
    """Each batch: the labelled rows first with their masks, then unlabelled rows whose labels are all ignored; each
    seam gives the loss what its paper compares the unlabelled rows with."""
    cfg = _semi_cfg(ph2_tiny, workdir, mlflow_uri, algorithm)
    net, _ = initial_network(cfg)
    pairs = few_shot_pairs(cfg.dataset, cfg.budget, cfg.seed)
    unl = unlabelled_items(cfg, [p["id"] for p in pairs])
    train = cfg.train.model_copy(update={"batch_size": 2, "epochs": 2, "epoch_length": 2})
    ds, sampler, prepare, loss, augs, train = semi_training(cfg, net, pairs, unl, train)
    assert isinstance(sampler, MixedBatchSampler) and train.batch_size == 5 and len(augs) == 2
    batch = torch.utils.data.default_collate([ds[i] for i in list(iter(sampler))[:5]])
    assert batch["labelled"].tolist() == [1, 1, 0, 0, 0]
    assert (batch["label"][2:] == IGNORE_INDEX).all() and {0.0, 1.0} <= set(batch["label"][:2].unique().tolist())

    if algorithm == "mean-teacher":
        from ignite.engine import Engine

        engine = Engine(lambda e, b: None)
        engine.network = net
        prepare.attach(engine)
        assert set(prepare.checkpointed()) == {"teacher"}
    elif algorithm == "fixmatch":
        prepare.network = net
    prepare.step = 1
    x, target, _, kwargs = prepare(batch, torch.device("cpu"))
    assert x.shape == batch["image"].shape and target["labelled"].tolist() == [1, 1, 0, 0, 0]
    if algorithm == "fixmatch":
        assert torch.equal(x[:2], batch["image"][:2]) and torch.equal(x[2:], batch[S.STRONG_KEY][2:])
        assert target["teacher_probs"].shape == (5, 1, 32, 32) and target["teacher_probs"][:2].abs().sum() == 0
        assert target["weight"] == 1.0
    elif algorithm == "mean-teacher":
        assert not torch.equal(x, batch["image"])  # the student's input noise
        assert target["teacher_probs"].shape == (5, 1, 32, 32) and target["weight"] < 0.01  # ramp-up starts near 0
    else:
        sigma = kwargs["sigma"]
        assert torch.equal(x[:2], batch["image"][:2]) and (sigma[:2] == 0.002).all() and (sigma[2:] != 0.002).all()
        assert torch.equal(target["image"], batch["image"])
    value = loss(net(x, **kwargs), target)
    assert torch.isfinite(value) and set(loss.terms) == {"mask_loss", "unsupervised_loss", "unsupervised_weight"}


def test_killed_semi_supervised_finetune_resumes_to_the_same_weights(ph2_tiny, workdir, mlflow_uri):
    """A mean-teacher fine-tune (its teacher's weights are state too) stopped after its first epoch's checkpoint and
    run again ends with the weights of an uninterrupted run, bit for bit."""
    full = run_finetuning(_semi_cfg(ph2_tiny, workdir, mlflow_uri, "mean-teacher", output_dir=str(workdir / "full")))
    ck = workdir / "full" / "checkpoints" / "finetune_checkpoint_2.pt"
    assert "teacher" in torch.load(ck, weights_only=True)
    (workdir / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(ck, workdir / "resumed" / "checkpoints")
    resumed = run_finetuning(_semi_cfg(ph2_tiny, workdir, mlflow_uri, "mean-teacher", output_dir=str(workdir / "resumed")))
    a, _ = load_model(full.checkpoint)
    b, _ = load_model(resumed.checkpoint)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # and differs from plain fine-tuning on the same subset (the unlabelled images did something)
    plain = run_finetuning(_ft_cfg(ph2_tiny, workdir, mlflow_uri, output_dir=str(workdir / "plain")))
    c, _ = load_model(plain.checkpoint)
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_semi_config_is_hashed_only_when_on(ph2_tiny, workdir, mlflow_uri):
    from medhybrid.workflows.fewshot import few_shot_hash

    plain = _ft_cfg(ph2_tiny, workdir, mlflow_uri)
    off = validate(FinetuneConfig, {**plain.model_dump(mode="json"), "semi": {"algorithm": "none", "weight": 3.0}})
    on = _semi_cfg(ph2_tiny, workdir, mlflow_uri, "fixmatch")
    assert few_shot_hash(plain) == few_shot_hash(off) != few_shot_hash(on)
