"""medhybrid.engines.robust and fine-tuning's ``robust`` options: L2-SP (Li et al. 2018), partial fine-tuning by
parameter names (Lee et al. 2023) and source rehearsal, each off by default and then invisible in a run's config and
hash. Runs use real PH2 and ISIC images, the tiny U-Net at 32 px and a few iterations on the CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import ISIC, PH2, real_split, write_dataset_yaml
from conftest import TINY_UNET as TINY
from pydantic import create_model
from torch import nn

from medhybrid.core.config import ConfigError, StrictModel, dump_config, validate
from medhybrid.core.runs import config_hash
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.engines import robust as R
from medhybrid.networks.checkpoints import load_model, network_meta, save_model
from medhybrid.networks.nets import ModelConfig, build_network
from medhybrid.workflows import finetune
from medhybrid.workflows.fewshot import few_shot_hash
from medhybrid.workflows.finetune import FinetuneConfig, run_finetuning

pytestmark = pytest.mark.usefixtures("workdir")

TINY_DICT = {"channels": [16, 32, 32], "attention_levels": [False, False, False]}


def _cfg(dataset, workdir, **kw) -> FinetuneConfig:
    """A fine-tuning config: tiny net, 32 px, 4 iterations in 2 epochs, budget 2, CPU, MLflow off; ``kw`` merged in."""
    d = {"dataset": str(dataset), "budget": 2, "seed": 0, "output_dir": str(workdir / "ft"), "method": "test",
         "preprocess": {"resolution": 32}, "model": TINY_DICT,
         "train": {"batch_size": 2, "lr": 1e-3, "warmup_iterations": 0, "device": "cpu", "check_data": False,
                   "progress": False, "threads": 1},
         "schedule": {"per_label": 1, "min_iterations": 4, "max_iterations": 4, "epochs": 2},
         "mlflow": {"enabled": False}}
    for k, v in kw.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return validate(FinetuneConfig, d, context={"base_dir": str(workdir)})


@pytest.fixture
def pretrained(isic_tiny, workdir):
    """A tiny network 'pretrained' on ISIC, saved as a model.pt: ``(network, path)``. Its weights are seeded random ones
    with small noise on every tensor, as training leaves them: MONAI's U-Net starts with zeroed output convolutions (in
    each residual block and the head), through which no gradient reaches the layers before at the first steps."""
    torch.manual_seed(5)
    net = build_network(TINY, 3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    meta = network_meta(net, TINY, Preprocess(resolution=32), load_dataset_spec(isic_tiny), "supervised")
    return net, save_model(net, meta, workdir / "pre" / "model.pt")


# --------------------------------------------------------------------------------------------- default off
def test_robust_defaults_leave_config_and_hash_unchanged(ph2_tiny, pretrained, workdir):
    """At its defaults ``robust`` is not in the dumped config, and the hash is the one a FinetuneConfig without the
    field (as it was before it existed) computes: every earlier run keeps its folder and result."""
    before = create_model("FinetuneConfigBefore", __base__=StrictModel,
                          **{k: (f.annotation, f) for k, f in FinetuneConfig.model_fields.items() if k != "robust"})
    for kw in ({}, {"init": str(pretrained[1]), "wise": 0.5, "semi": {"algorithm": "fixmatch"}}):
        cfg = _cfg(ph2_tiny, workdir, **kw)
        old = validate(before, dump_config(cfg), context={"base_dir": str(workdir)})
        assert "robust" not in dump_config(cfg) and dump_config(old) == dump_config(cfg)
        assert config_hash(cfg) == config_hash(old) and few_shot_hash(cfg) == few_shot_hash(old)
        explicit = _cfg(ph2_tiny, workdir, robust={"l2sp_alpha": 0, "l2sp_beta": 0.0, "trainable": None,
                                                   "rehearsal": {"dataset": None, "splits": ["train"], "share": 0.25}},
                        **kw)
        assert "robust" not in dump_config(explicit)
        assert config_hash(explicit) == config_hash(cfg) and few_shot_hash(explicit) == few_shot_hash(cfg)
    # an option set: only it is written, and the hash changes
    on = _cfg(ph2_tiny, workdir, init=str(pretrained[1]), robust={"l2sp_alpha": 0.1})
    assert dump_config(on)["robust"] == {"l2sp_alpha": 0.1}
    assert few_shot_hash(on) != few_shot_hash(_cfg(ph2_tiny, workdir, init=str(pretrained[1])))


def test_robust_config_errors(ph2_tiny, isic_tiny, pretrained, workdir):
    with pytest.raises(ConfigError, match="l2sp_alpha=0.1 pulls the weights towards the pretrained ones: it needs init"):
        _cfg(ph2_tiny, workdir, robust={"l2sp_alpha": 0.1})
    assert _cfg(ph2_tiny, workdir, robust={"l2sp_beta": 0.1}).robust.l2sp  # plain L2 needs no start
    with pytest.raises(ConfigError, match="trainable is empty"):
        _cfg(ph2_tiny, workdir, robust={"trainable": []})
    with pytest.raises(ConfigError, match="trainable pattern '\\(up' is not a regular expression"):
        _cfg(ph2_tiny, workdir, robust={"trainable": ["decoder", "(up"]})
    with pytest.raises(ConfigError, match="cannot be combined"):
        _cfg(ph2_tiny, workdir, semi={"algorithm": "mean-teacher"}, robust={"rehearsal": {"dataset": str(isic_tiny)}})
    with pytest.raises(ConfigError, match="'ph2_tiny' is a target"):
        _cfg(ph2_tiny, workdir, robust={"rehearsal": {"dataset": str(ph2_tiny), "splits": ["pool"]}})
    with pytest.raises(ConfigError, match="held-out test splits are never trained on"):
        _cfg(ph2_tiny, workdir, robust={"rehearsal": {"dataset": str(isic_tiny), "splits": ["train", "test"]}})
    with pytest.raises(ValueError, match="matches no parameter"):
        R.freeze(build_network(TINY, 3), ["encoder_of_nothing"])


# --------------------------------------------------------------------------------------------- L2-SP
def test_l2sp_penalty_is_eq_4_by_hand():
    """Omega(w) = alpha/2 ||w_S - w_S^0||^2 + beta/2 ||w_Sbar||^2, S the names with a start; its gradient is
    alpha (w - w^0) on S and beta w on Sbar."""
    a = torch.tensor([1.0, 2.0, -1.0], requires_grad=True)
    b = torch.tensor([[3.0, -0.5]], requires_grad=True)
    a0 = torch.tensor([0.5, 2.0, 1.0])
    alpha, beta = 2.0, 0.1
    omega = R.l2sp_penalty({"a": a, "b": b}, {"a": a0}, alpha, beta)
    hand = alpha / 2 * (0.5**2 + 0.0**2 + 2.0**2) + beta / 2 * (3.0**2 + 0.5**2)  # 4.25 + 0.4625
    assert omega.item() == pytest.approx(hand) == pytest.approx(4.7125)
    omega.backward()
    assert torch.allclose(a.grad, alpha * (a.detach() - a0)) and torch.allclose(b.grad, beta * b.detach())
    assert R.l2sp_penalty({"a": a}, {"a": a.detach()}, 5.0, 5.0).item() == 0.0  # at the start: no pull

    # the wrapper adds it to any loss and logs it beside the loss's own terms
    net = nn.Linear(2, 1)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight += 1.0  # weight moved by 1 per element; bias not in S (a new tensor): plain L2

    class Inner(nn.Module):
        terms = {"mask_loss": 0.5}

        def forward(self, pred, target):
            return torch.tensor(0.5)

    loss = R.L2SPLoss(Inner(), net, {"weight": start["weight"]}, alpha=4.0, beta=2.0)
    got = loss(None, None)
    assert got.item() == pytest.approx(0.5 + 4.0 / 2 * 2 + 2.0 / 2 * net.bias.item() ** 2)
    assert loss.terms == {"mask_loss": 0.5, "l2sp": pytest.approx(got.item() - 0.5)}


def _distance(net: nn.Module, start: nn.Module) -> float:
    s = start.state_dict()
    return sum((v - s[k]).square().sum().item() for k, v in net.state_dict().items()) ** 0.5


def test_l2sp_keeps_the_fine_tuned_weights_near_the_start(ph2_tiny, pretrained, workdir):
    """The same fine-tune with a strong pull (alpha = 1000) ends far closer to the pretrained weights than without
    it (alpha = 0); the model file records the option."""
    pre, ckpt = pretrained
    kw = {"init": str(ckpt), "augment": {"enabled": False}, "schedule": {"min_iterations": 6, "max_iterations": 6}}
    free = run_finetuning(_cfg(ph2_tiny, workdir, output_dir=str(workdir / "free"), **kw))
    held = run_finetuning(_cfg(ph2_tiny, workdir, output_dir=str(workdir / "held"), robust={"l2sp_alpha": 1000.0}, **kw))
    (f, fmeta), (h, hmeta) = load_model(free.checkpoint), load_model(held.checkpoint)
    d_free, d_held = _distance(f, pre), _distance(h, pre)
    print(f"distance to the start after 6 iterations: alpha=0 {d_free:.4f}, alpha=1000 {d_held:.4f}")
    assert d_held > 0 and d_held < 0.5 * d_free
    assert hmeta["robust"] == {"l2sp_alpha": 1000.0} and "robust" not in fmeta
    assert yaml.safe_load((held.folder / "config.yaml").read_text())["robust"] == {"l2sp_alpha": 1000.0}
    assert "robust" not in yaml.safe_load((free.folder / "config.yaml").read_text())


# --------------------------------------------------------------------------------------------- partial fine-tuning
@pytest.mark.parametrize("mc", [TINY, ModelConfig()], ids=["tiny", "default"])
def test_presets_name_the_unets_parts(mc):
    """The presets select, by name, the parts they say: the up path and output block, every GroupNorm and bias."""
    net = build_network(mc, 3)
    names = [k for k, _ in net.named_parameters()]
    norms = {f"{m}.{p}" for m, mod in net.named_modules() if isinstance(mod, nn.GroupNorm) for p, _ in mod.named_parameters()}
    biases = {k for k in names if k.endswith(".bias")}
    decoder = {k for k in names if k.startswith(("backbone.up_blocks.", "backbone.out."))}
    expected = {"decoder": decoder, "norms-biases": norms | biases, "decoder+norms": decoder | norms,
                "head": {"backbone.out.2.conv.weight", "backbone.out.2.conv.bias"}}
    assert set(expected) == set(R.PRESETS)
    for preset, want in expected.items():
        assert set(R.trainable_names(net, [preset])) == want, preset
        assert 0 < len(want) < len(names)
    # presets and patterns combine
    both = set(R.trainable_names(net, ["head", r"^backbone\.conv_in\."]))
    assert both == expected["head"] | {"backbone.conv_in.conv.weight", "backbone.conv_in.conv.bias"}


@pytest.mark.parametrize("preset", ["decoder", "norms-biases"])
def test_partial_fine_tuning_moves_exactly_the_trainable_parameters(ph2_tiny, pretrained, workdir, preset):
    """After a short fine-tune with weight decay (AdamW would shrink any parameter it stepped), every parameter the
    preset selects has changed and every other one is bitwise the pretrained value."""
    pre, ckpt = pretrained
    cfg = _cfg(ph2_tiny, workdir, init=str(ckpt), robust={"trainable": [preset]}, train={"weight_decay": 0.1},
               schedule={"min_iterations": 2, "max_iterations": 2, "epochs": 1})
    res = run_finetuning(cfg)
    net, meta = load_model(res.checkpoint)
    trained = set(R.trainable_names(pre, [preset]))
    start, end = pre.state_dict(), net.state_dict()
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert moved == trained, (sorted(moved - trained)[:3], sorted(trained - moved)[:3])
    assert meta["robust"] == {"trainable": [preset]}


# --------------------------------------------------------------------------------------------- rehearsal
def test_rehearsal_batches_hold_source_rows_at_the_share(isic_tiny, workdir, monkeypatch):
    """Each batch of 4 holds 3 target pool rows then 1 ISIC train row (share 0.25), each with its mask; the run ends
    with a model.pt that records the rehearsal. The target's test images are garbage bytes: reading one would fail the
    run, so finishing proves they are never read (data checks on)."""
    split = real_split(PH2)
    pool, test = split["pool"][:4], split["test"][:2]
    root = workdir / "ph2_broken_test"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i in pool + test:
        shutil.copy(PH2 / "masks" / f"{i}_lesion.png", root / "masks")
        if i in pool:
            shutil.copy(PH2 / "images" / f"{i}.png", root / "images")
        else:
            (root / "images" / f"{i}.png").write_bytes(b"not an image" * 100)
    target = write_dataset_yaml(workdir / "datasets", "ph2_4", root, {"pool": pool, "test": test}, role="target",
                                mask_suffix="_lesion", channels=3)
    source_train = set(real_split(ISIC)["train"][:16])

    seen: list[dict] = []

    class Recording(finetune.SegmentationPrepareBatch):
        def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
            x, y, args, kw = super().__call__(batchdata, device, non_blocking, **kwargs)
            seen.append({"ids": list(batchdata["id"]), "label": y.clone(), "image": x.shape})
            return x, y, args, kw

    monkeypatch.setattr(finetune, "SegmentationPrepareBatch", Recording)
    cfg = _cfg(target, workdir, budget=4, train={"batch_size": 4, "check_data": True},
               robust={"rehearsal": {"dataset": str(isic_tiny), "share": 0.25}})
    res = run_finetuning(cfg)

    assert len(seen) == 4 and set(res.ids) == set(pool)
    for b in seen:
        assert b["image"] == (4, 3, 32, 32)
        assert set(b["ids"][:3]) <= set(pool) and b["ids"][3] in source_train  # target rows, then the source's
        assert not set(b["ids"]) & set(test)
        assert set(b["label"].unique().tolist()) <= {-1.0, 0.0, 1.0}  # PH2 is padded to square: ignored pixels
        assert set(b["label"][3].unique().tolist()) == {0.0, 1.0}  # the source's mask, lesion and background
    assert len({b["ids"][3] for b in seen}) == 4  # drawn without replacement within the epoch's permutation
    _, meta = load_model(res.checkpoint)
    assert (res.folder / "model.pt").is_file()
    assert meta["robust"] == {"rehearsal": {"dataset": "isic_tiny", "splits": ["train"], "share": 0.25}}
    assert json.loads(json.dumps(meta["robust"])) == meta["robust"]  # plain values


def test_rehearsal_sees_only_the_named_source_splits(isic_tiny, workdir):
    """``splits: [val]`` rehearses the source's val images, never its train ones."""
    target = write_dataset_yaml(workdir / "datasets", "ph2_2", PH2, {"pool": real_split(PH2)["pool"][:2],
                                                                    "test": real_split(PH2)["test"][:1]},
                                role="target", mask_suffix="_lesion", channels=3)
    cfg = _cfg(target, workdir, robust={"rehearsal": {"dataset": str(isic_tiny), "splits": ["val"], "share": 0.5}})
    pairs = finetune.few_shot_pairs(cfg.dataset, 2, 0)
    train_cfg = cfg.train.model_copy(update={"epochs": 2, "epoch_length": 2})
    ds, sampler, augs = finetune.rehearsal_training(cfg, pairs, train_cfg)
    assert len(ds) == 2 + 4 and sampler.per_batch == (1, 1) and len(augs) == 2
    val = set(real_split(ISIC)["val"][:4])
    assert {ds[i]["id"] for i in range(2, 6)} == val
