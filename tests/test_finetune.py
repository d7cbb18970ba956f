"""medhybrid.workflows.finetune: weight transfer, few-shot fine-tuning on a target's pool, and the point of it all:
a pretrained start beats a random one at a tiny label budget."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PH2, artifact_paths, isic_yaml, mlflow_client, ph2_yaml, real_split
from conftest import TINY_UNET as TINY

from medhybrid.core.config import ConfigError, load_config, validate
from medhybrid.data.datasets import few_shot_ids
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.networks.checkpoints import load_model, network_meta, save_model
from medhybrid.networks.nets import build_network
from medhybrid.workflows.evaluate import evaluate
from medhybrid.workflows.finetune import AugmentConfig, FinetuneConfig, FinetuneSchedule, augmentation, initial_network, run_finetuning
from medhybrid.workflows.pretrain import PretrainConfig, run_pretraining

pytestmark = pytest.mark.usefixtures("workdir")

TINY_DICT = {"channels": [16, 32, 32], "attention_levels": [False, False, False]}


def _ft_cfg(dataset, workdir, mlflow_uri, **kw) -> FinetuneConfig:
    """A fine-tuning config: tiny net, 32 px, 4 iterations in 2 epochs, budget 2, CPU."""
    d = {"dataset": str(dataset), "budget": 2, "seed": 0, "output_dir": str(workdir / "ft"), "method": "test",
         "preprocess": {"resolution": 32}, "model": TINY_DICT,
         "train": {"batch_size": 2, "lr": 1e-3, "warmup_iterations": 0, "device": "cpu", "check_data": False, "progress": False},
         "schedule": {"per_label": 1, "min_iterations": 4, "max_iterations": 4, "epochs": 2},
         "mlflow": {"tracking_uri": mlflow_uri}}
    for k, v in kw.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return validate(FinetuneConfig, d, context={"base_dir": str(workdir)})


def _save(net, folder, dataset_yaml, mode="supervised", resolution=32):
    meta = network_meta(net, TINY, Preprocess(resolution=resolution), load_dataset_spec(dataset_yaml), mode)
    return save_model(net, meta, folder / "model.pt")


def test_initial_network(isic_tiny, v7_tiny, ph2_tiny, workdir, mlflow_uri):
    torch.manual_seed(4)
    pre = build_network(TINY, 3)
    ckpt = _save(pre, workdir / "pre", isic_tiny)
    net, report = initial_network(_ft_cfg(ph2_tiny, workdir, mlflow_uri, init=str(ckpt)))
    assert report["skipped"] == {} and report["missing"] == [] and len(report["loaded"]) == len(pre.state_dict())
    assert all(torch.equal(v, pre.state_dict()[k]) for k, v in net.state_dict().items())
    # from scratch: seeded by the fine-tuning seed
    a, rep = initial_network(_ft_cfg(ph2_tiny, workdir, mlflow_uri))
    b, _ = initial_network(_ft_cfg(ph2_tiny, workdir, mlflow_uri))
    c, _ = initial_network(_ft_cfg(ph2_tiny, workdir, mlflow_uri, seed=1))
    assert rep == {"loaded": [], "skipped": {}, "missing": []}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    # a grey checkpoint cannot start an RGB target
    grey = _save(build_network(TINY, 1), workdir / "grey", v7_tiny)
    with pytest.raises(ValueError, match="pretrained on 1-channel images, target 'ph2_tiny' has 3"):
        initial_network(_ft_cfg(ph2_tiny, workdir, mlflow_uri, init=str(grey)))


# --------------------------------------------------------------------------------------------- config
def test_schedule_and_augmentation():
    s = FinetuneSchedule(per_label=20, min_iterations=100, max_iterations=400)
    assert [s.iterations(b) for b in (1, 5, 10, 50)] == [100, 100, 200, 400]
    assert augmentation(AugmentConfig(enabled=False)) is None
    aug = augmentation(AugmentConfig())
    aug.set_random_state(seed=0)
    img = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 8, 8)[:1] / 64 - 1
    lab = (img > 0).float()
    out = aug({"image": img.clone(), "label": lab.clone()})
    assert out["image"].shape == (1, 8, 8) and set(torch.as_tensor(out["label"]).unique().tolist()) <= {0.0, 1.0}


def test_source_dataset_is_not_a_target(isic_tiny, workdir, mlflow_uri):
    with pytest.raises(ConfigError, match="'isic_tiny' is a source dataset; few-shot fine-tuning draws from a target's pool"):
        _ft_cfg(isic_tiny, workdir, mlflow_uri)


def test_missing_init_checkpoint(ph2_tiny, workdir, mlflow_uri):
    with pytest.raises(ConfigError, match="pretrained checkpoint .*nope.pt not found"):
        _ft_cfg(ph2_tiny, workdir, mlflow_uri, init=str(workdir / "nope.pt"))


def test_budget_larger_than_pool(ph2_tiny, workdir, mlflow_uri):
    cfg = _ft_cfg(ph2_tiny, workdir, mlflow_uri, budget=9)  # the tiny pool has 8
    with pytest.raises(ValueError, match="label budget 9 is larger than the pool \\(8 labelled images\\)"):
        run_finetuning(cfg)
    assert not (cfg.folder / "model.pt").exists() and not (cfg.folder / "subset.json").exists()


# --------------------------------------------------------------------------------------------- run
def test_run_finetuning_tiny_target(ph2_tiny, workdir, mlflow_uri):
    parent = mlflow_client(mlflow_uri).create_run(
        mlflow_client(mlflow_uri).create_experiment("medhybrid", artifact_location=(workdir / "mlruns").as_uri())).info.run_id
    cfg = _ft_cfg(ph2_tiny, workdir, mlflow_uri, parent_run_id=parent, tags={"study": "unit"})
    res = run_finetuning(cfg)
    folder = cfg.folder

    pool = real_split(PH2)["pool"][:8]
    subset = json.loads((folder / "subset.json").read_text())
    assert subset == {"budget": 2, "seed": 0, "ids": few_shot_ids(pool, 2, 0)}
    assert set(subset["ids"]) <= set(pool) and res.ids == subset["ids"]
    assert not set(subset["ids"]) & set(real_split(PH2)["test"])

    net, meta = load_model(res.checkpoint)
    assert res.checkpoint == folder / "model.pt"
    assert meta["mode"] == "finetune" and meta["method"] == "test" and meta["budget"] == 2 and meta["seed"] == 0
    assert meta["dataset"] == "ph2_tiny" and meta["image_channels"] == 3
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["finetune_checkpoint_2.pt", "finetune_checkpoint_4.pt"]
    assert load_config(FinetuneConfig, folder / "config.yaml").model_dump() == cfg.model_dump()
    state = json.loads((folder / "state.json").read_text())
    assert state["status"] == "finished" and state["ids"] == subset["ids"] and state["mlflow_run_id"] == res.run_id

    c = mlflow_client(mlflow_uri)
    run = c.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "finetune-test-b2-s0"
    t = run.data.tags
    assert (t["medhybrid.stage"], t["method"], t["budget"], t["seed"], t["domain"], t["study"]) == \
        ("finetune", "test", "2", "0", "ph2_tiny", "unit")
    assert t["mlflow.parentRunId"] == parent
    assert run.data.params["budget"] == "2" and run.data.params["dataset.name"] == "ph2_tiny"
    assert "train_loss" in run.data.metrics
    assert artifact_paths(c, res.run_id) == ["config.yaml", "subset.json"]

    # a second call finds the finished run
    stamp = res.checkpoint.stat().st_mtime_ns
    again = run_finetuning(cfg)
    assert again.run_id == res.run_id and again.ids == res.ids and res.checkpoint.stat().st_mtime_ns == stamp
    # another seed in the same folder is another configuration
    with pytest.raises(ConfigError, match="different configuration"):
        run_finetuning(_ft_cfg(ph2_tiny, workdir, mlflow_uri, seed=1))


def test_finetuning_starts_from_the_pretrained_weights(isic_tiny, ph2_tiny, workdir, mlflow_uri):
    torch.manual_seed(2)
    pre = build_network(TINY, 3)
    ckpt = _save(pre, workdir / "pre", isic_tiny)
    cfg = _ft_cfg(ph2_tiny, workdir, mlflow_uri, init=str(ckpt), model={"channels": [32, 32], "attention_levels": [False, False]},
                  schedule={"min_iterations": 2, "max_iterations": 2, "epochs": 1}, augment={"enabled": False})
    res = run_finetuning(cfg)
    assert res.transfer["skipped"] == {} and res.transfer["missing"] == []
    net, meta = load_model(res.checkpoint)
    # the architecture is the checkpoint's (the config's model section is not used), and 2 small steps move it little
    assert tuple(meta["model"]["channels"]) == (16, 32, 32)
    diffs = [(net.state_dict()[k] - v).abs().max().item() for k, v in pre.state_dict().items() if v.is_floating_point()]
    assert 0 < max(diffs) < 0.05


def test_wise_fine_tune_saves_the_midpoint_of_pretrained_and_fine_tuned(isic_tiny, ph2_tiny, workdir, mlflow_uri):
    torch.manual_seed(3)
    pre = build_network(TINY, 3)
    ckpt = _save(pre, workdir / "pre", isic_tiny)
    kw = {"init": str(ckpt), "schedule": {"min_iterations": 2, "max_iterations": 2, "epochs": 1}}
    plain = run_finetuning(_ft_cfg(ph2_tiny, workdir, mlflow_uri, **kw))
    wise = run_finetuning(_ft_cfg(ph2_tiny, workdir, mlflow_uri, wise=0.5, output_dir=str(workdir / "wise"), **kw))
    (a, _), (w, meta) = load_model(plain.checkpoint), load_model(wise.checkpoint)
    assert meta["wise"] == 0.5 and "wise" not in load_model(plain.checkpoint)[1]
    moved = 0
    for k, v in pre.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(w.state_dict()[k], (v + a.state_dict()[k]) / 2, atol=1e-6), k
            moved += not torch.equal(a.state_dict()[k], v)
    assert moved > 0  # the plain fine-tune did move the weights
    # the default is not written, so earlier runs keep their configuration
    assert "\nwise:" not in (plain.folder / "config.yaml").read_text()
    assert "\nwise: 0.5" in (wise.folder / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="needs init"):
        _ft_cfg(ph2_tiny, workdir, mlflow_uri, wise=0.5)


# --------------------------------------------------------------------------------------------- pretrained beats scratch
@pytest.mark.slow
def test_pretrained_beats_scratch_at_two_labels(data, workdir, mlflow_uri):
    """The claim the project rests on, at toy scale: a U-Net pretrained (supervised) on 200 ISIC images and then
    fine-tuned on 2 PH2 images segments 30 PH2 test images clearly better than the same fine-tuning from random
    weights. Fixed seeds, one CPU thread, 32 px. Measured (seeds 0, 1): pretrained 0.78, 0.85 Dice; scratch
    0.67, 0.76."""
    source = isic_yaml(workdir / "datasets", n_train=200, n_val=8, name="isic200")
    target = ph2_yaml(workdir / "datasets", n_pool=100, n_test=30, name="ph2_30")
    pre_cfg = load_config(PretrainConfig, None, [
        f"dataset={source}", "mode=supervised", f"output_dir={workdir / 'pre'}", f"mlflow.tracking_uri={mlflow_uri}",
        "preprocess.resolution=32", "preprocess.aspect=stretch", "model.channels=[16,32,32]",
        "model.attention_levels=[false,false,false]", "train.batch_size=8", "train.epochs=2", "train.epoch_length=75",
        "train.lr=1e-3", "train.warmup_iterations=10", "train.val_max_images=8", "train.check_data=false",
        "train.device=cpu", "train.progress=false"])
    pre = run_pretraining(pre_cfg)
    assert pre.metrics["val_dice"] > 0.8  # it learned ISIC lesions

    dice: dict[str, list[float]] = {"scratch": [], "pretrained": []}
    for seed in (0, 1):  # two label subsets
        for name, init in (("scratch", None), ("pretrained", str(pre.checkpoint))):
            cfg = _ft_cfg(target, workdir, mlflow_uri, init=init, seed=seed, output_dir=str(workdir / f"ft_{name}_{seed}"),
                          method=name, preprocess={"resolution": 32, "aspect": "stretch"},
                          train={"lr": 3e-4, "warmup_iterations": 5},
                          schedule={"min_iterations": 30, "max_iterations": 30, "epochs": 2})
            res = run_finetuning(cfg)
            assert len(res.ids) == 2 and set(res.ids) <= set(real_split(PH2)["pool"])
            net, _ = load_model(res.checkpoint)
            ev = evaluate(net, cfg.dataset, cfg.preprocess, "test", out_dir=workdir / f"eval_{name}_{seed}")
            assert len(ev.rows) == 30
            dice[name].append(ev.summary["test_dice"])
    print(f"PH2 test Dice at budget 2, seeds 0 and 1: {dice}")
    mean = {k: sum(v) / len(v) for k, v in dice.items()}
    assert all(p > s for p, s in zip(dice["pretrained"], dice["scratch"], strict=True)), dice  # for each subset
    assert mean["pretrained"] > 0.7, dice
    assert mean["pretrained"] > mean["scratch"] + 0.05, dice


def test_chosen_ids_replace_the_seeded_draw(workdir, mlflow_uri, ph2_tiny):
    pool = real_split(PH2)["pool"][:8]
    with pytest.raises(ConfigError, match="budget 3 does not match the 2 ids"):
        _ft_cfg(ph2_tiny, workdir, mlflow_uri, budget=3, ids=pool[:2])
    with pytest.raises(ConfigError, match="distinct"):
        _ft_cfg(ph2_tiny, workdir, mlflow_uri, ids=[pool[0], pool[0]])
    cfg = _ft_cfg(ph2_tiny, workdir, mlflow_uri, budget=None, ids=[pool[5], pool[2]], output_dir=None, method="al")
    assert cfg.folder.name.endswith("-al-b2-s0")
    res = run_finetuning(cfg.model_copy(update={"output_dir": workdir / "ft_ids"}))
    assert res.ids == [pool[5], pool[2]]
    assert json.loads((workdir / "ft_ids" / "subset.json").read_text())["ids"] == [pool[5], pool[2]]
