"""medhybrid.experiments.ablation: methods x budgets x seeds as MLflow child runs, shared pretraining, resume, failures."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import child_runs, mlflow_client, ph2_yaml
from monai.metrics import compute_dice
from PIL import Image

from medhybrid.core.config import ConfigError, validate
from medhybrid.data.datasets import few_shot_pairs, load_pairs
from medhybrid.data.specs import Preprocess
from medhybrid.experiments.ablation import (
    AblationConfig,
    finetune_config,
    pretrain_config,
    pretraining_of,
    run_ablation,
)
from medhybrid.networks.checkpoints import network_meta, save_model
from medhybrid.networks.nets import ModelConfig, build_network
from medhybrid.workflows.finetune import unlabelled_items
from medhybrid.workflows.inference import infer_files

pytestmark = pytest.mark.usefixtures("workdir")

TINY_MODEL = {"channels": [16, 32, 32], "attention_levels": [False, False, False]}
CPU = {"device": "cpu", "check_data": False, "progress": False}


def _config(workdir, mlflow_uri, source, methods: dict, seeds=(0, 1)) -> AblationConfig:
    target = ph2_yaml(workdir / "datasets", n_pool=8, n_test=4)
    return validate(AblationConfig, {
        "name": "t", "source": str(source), "target": str(target), "methods": methods, "budgets": [2], "seeds": list(seeds),
        "output_dir": str(workdir / "abl"), "reference": "diffusion",
        "pretrain": {"preprocess": {"resolution": 32}, "model": TINY_MODEL,
                     "train": {"batch_size": 4, "epochs": 2, "epoch_length": 3, "lr": 1e-3, "warmup_iterations": 0,
                               "val_max_images": 4, **CPU}},
        "finetune": {"train": {"batch_size": 2, "lr": 1e-3, "warmup_iterations": 0, **CPU},
                     "schedule": {"per_label": 1, "min_iterations": 4, "max_iterations": 4, "epochs": 2}},
        "pixel_features": {"ensemble": {"members": 2, "max_pixels": 2000, "max_epochs": 3}},
        "mlflow": {"tracking_uri": mlflow_uri}}, context={"base_dir": str(workdir)})


BROKEN = {"pretrain": "supervised", "finetune": {"train": {"no_such_setting": 1}}}
"""A method that passes the ablation's config check and fails every fine-tune when it is built (the fine-tune's config
has a key FinetuneConfig does not know); its supervised pretraining still runs and is scored before fine-tuning."""


def dice_of_written_masks(model: Path, pairs: list[dict], out: Path) -> dict[str, float]:
    """Per image, the Dice of the mask ``medhybrid infer`` writes with ``model`` against the image's own mask file (PH2:
    0 background, 255 lesion), by MONAI's ``compute_dice`` on the two files: independent of the evaluation code."""
    res = infer_files(model, [p["image"] for p in pairs], out, batch_size=len(pairs), device="cpu", quality=False)
    assert not res.failures, res.failures
    scores = {}
    for p in pairs:
        pred = np.asarray(Image.open(out / f"{Path(p['image']).stem}_mask.png")) > 0
        truth = np.asarray(Image.open(p["label"])) > 127
        assert pred.shape == truth.shape, p["id"]
        scores[p["id"]] = float(compute_dice(torch.from_numpy(pred)[None, None].double(),
                                             torch.from_numpy(truth)[None, None].double(), include_background=True,
                                             ignore_empty=False).item())
    return scores


def per_image_csv(path: Path) -> dict[str, float]:
    with open(path) as fh:
        return {r["id"]: float(r["dice"]) for r in csv.DictReader(fh)}


def test_default_methods_include_ddpm_features_sharing_the_diffusion_pretraining(workdir, mlflow_uri, isic_tiny):
    cfg = validate(AblationConfig, {"name": "d", "source": str(isic_tiny), "target": "ph2"})
    assert list(cfg.methods) == ["scratch", "supervised", "diffusion", "hybrid", "mdm", "ddpm-features"]
    assert cfg.budgets == [1, 2, 5, 10, 20, 50, None] and cfg.seeds == [0, 1, 2]
    assert pretraining_of(cfg, "ddpm-features") == "diffusion"
    assert pretrain_config(cfg, "ddpm-features").folder == pretrain_config(cfg, "diffusion").folder
    with pytest.raises(ConfigError, match="head"):
        validate(AblationConfig, {"name": "d", "source": str(isic_tiny), "target": "ph2",
                                  "methods": {"x": {"pretrain": "diffusion", "head": "linear"}}})


def test_ddpm_features_needs_a_generative_pretraining(workdir, mlflow_uri, isic_tiny):
    for pretrain in ("supervised", "none"):  # refused with the config, before anything runs
        with pytest.raises(ConfigError, match=f"needs a generatively pretrained network .*not '{pretrain}'"):
            _config(workdir, mlflow_uri, isic_tiny, {"bad": {"pretrain": pretrain, "head": "ddpm-features"}})


def test_ablation_runs_records_reports_and_resumes(workdir, mlflow_uri, isic_tiny, caplog):
    methods = {"scratch": {"pretrain": "none"}, "diffusion": {"pretrain": "diffusion"},
               "ddpm-features": {"pretrain": "diffusion", "head": "ddpm-features"},
               "broken": BROKEN}
    cfg = _config(workdir, mlflow_uri, isic_tiny, methods)
    out = run_ablation(cfg)
    folder = workdir / "abl"
    test_pairs = load_pairs(cfg.target, "test")

    # a failed method is recorded and does not stop the others
    assert sorted(f.split(":")[0] for f in out["failures"]) == ["broken b2 s0", "broken b2 s1"], out["failures"]
    assert (folder / "failures.log").read_text().count("no_such_setting") >= 2
    # one pretraining per distinct (mode, overrides): ddpm-features reuses the diffusion network
    assert sorted(p.name for p in (folder / "pretrain").iterdir()) == ["broken", "diffusion", "scratch"]

    client = mlflow_client(mlflow_uri)
    parent = out["parent_run_id"]
    assert client.get_run(parent).info.status == "FAILED"
    runs = child_runs(mlflow_uri, parent)
    assert len(runs) == 6  # 3 working methods x 1 budget x 2 seeds, each its own run
    keys = sorted((r.data.tags["method"], r.data.tags["budget"], r.data.tags["seed"]) for r in runs)
    assert keys == sorted((m, "2", s) for m in ("scratch", "diffusion", "ddpm-features") for s in ("0", "1"))
    diffusion_pre = json.loads((folder / "pretrain" / "diffusion" / "state.json").read_text())["mlflow_run_id"]
    # every run that ran left its folder: the model, and a score for each of the 4 test images; the failed ones none
    ran = {(m, s) for m in ("scratch", "diffusion", "ddpm-features") for s in (0, 1)}
    assert {(p.parent.parent.name, int(p.parent.name.split("-s")[1])) for p in (folder / "finetune").glob("*/*/state.json")
            if json.loads(p.read_text()).get("status") == "finished"} == ran
    for m, seed in ran:
        assert sorted(per_image_csv(folder / "finetune" / m / f"b2-s{seed}" / "eval" / "per_image.csv")) == \
            sorted(p["id"] for p in test_pairs)
    assert not list((folder / "finetune").glob("broken/*/model.pt"))
    for r in runs:
        method, seed = r.data.tags["method"], r.data.tags["seed"]
        assert r.info.status == "FINISHED"
        assert r.data.tags["domain"] == "ph2_tiny" and r.data.tags["ablation"] == "t"
        if method != "scratch":
            assert r.data.tags["pretrain_run_id"] == diffusion_pre
        # the recorded Dice is the mean of the run's per-image scores ...
        run_folder = folder / "finetune" / method / f"b2-s{seed}"
        recorded = per_image_csv(run_folder / "eval" / "per_image.csv")
        assert r.data.metrics["test_dice"] == pytest.approx(np.mean(list(recorded.values())), abs=1e-6)
        if method != "ddpm-features" and seed == "0":  # ... which are the Dice of the masks the model writes
            own = dice_of_written_masks(run_folder / "model.pt", test_pairs, workdir / "masks" / method)
            assert recorded == pytest.approx(own, abs=1e-6), method
    # the report's numbers are the MLflow runs' numbers
    by_id = {r.info.run_id: r for r in runs}
    with open(out["report"]["results"]) as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["run_id"] for r in rows) == sorted(by_id)
    for row in rows:
        run = by_id[row["run_id"]]
        assert float(row["test_dice"]) == pytest.approx(run.data.metrics["test_dice"], abs=0)
        assert (row["method"], row["seed"]) == (run.data.tags["method"], run.data.tags["seed"])
    with open(out["report"]["summary"]) as fh:
        summary = {(r["method"], r["budget"]): r for r in csv.DictReader(fh)}
    for m in ("scratch", "diffusion", "ddpm-features"):
        vals = [r.data.metrics["test_dice"] for r in runs if r.data.tags["method"] == m]
        assert float(summary[(m, "2")]["dice_mean"]) == pytest.approx(np.mean(vals), abs=1e-4)
        assert float(summary[(m, "2")]["dice_std"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-4)
    md = out["report"]["markdown"].read_text()
    assert "| ddpm-features |" in md and "Paired difference `diffusion` − baseline" in md
    assert "| baseline | budget | seeds | images | mean diff | 95 % CI | p | p (Holm) |" in md
    assert "| scratch | 2 | 2 | 8 |" in md and "| ddpm-features | 2 | 2 | 8 |" in md  # 2 seeds x 4 paired test images
    assert "**Verdict at ≤ 10 labels: `diffusion` " in md
    # ... and the paired difference is the one the runs' own per-image artifacts give
    def per_image(method, seed):
        run = next(r for r in runs if r.data.tags["method"] == method and r.data.tags["seed"] == seed)
        return per_image_csv(client.download_artifacts(run.info.run_id, "eval/per_image.csv", str(workdir / "dl" / run.info.run_id)))

    diff = []
    for s in ("0", "1"):
        ref, base = per_image("diffusion", s), per_image("scratch", s)
        diff.append(np.mean([ref[i] - base[i] for i in base]))
    diff = np.mean(diff)
    assert f"| scratch | 2 | 2 | 8 | {diff:+.3f} |" in md
    # did the generative pretext task learn anything? diffusion against scratch, paired, with its samples
    d = next(line for line in md.splitlines() if line.startswith("**Did the generative pretext task learn anything"))
    assert f"`diffusion` − `scratch` {diff:+.3f} [" in d and ("Yes: " in d or "No: " in d and "cannot test the hybrid" in d)
    assert "![samples](samples-diffusion.png)" in md and (folder / "report" / "samples-diffusion.png").is_file()
    # budget 0: a pretraining that learned masks (supervised, here under "broken") is scored before any fine-tuning,
    # once, and only that one
    assert sorted(p.name for p in (folder / "zero-shot").iterdir()) == ["broken"]
    zs = json.loads((folder / "zero-shot" / "broken" / "state.json").read_text())
    assert zs["scored_on"] == "test"
    zero = dice_of_written_masks(Path(zs["pretraining"]), test_pairs, workdir / "masks" / "zero-shot")
    assert per_image_csv(folder / "zero-shot" / "broken" / "eval" / "per_image.csv") == pytest.approx(zero, abs=1e-6)
    assert zs["scores"]["test_dice"] == pytest.approx(np.mean(list(zero.values())), abs=1e-6)
    assert f"| broken (broken) | {zs['scores']['test_dice']:.3f} | – |" in md
    broken_pre = json.loads((folder / "pretrain" / "broken" / "state.json").read_text())["mlflow_run_id"]
    assert client.get_run(broken_pre).data.metrics["zero_shot_test_dice"] == pytest.approx(zs["scores"]["test_dice"])
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/dice_vs_labels.png", "report/summary.csv", "report/results.csv"} <= arts

    # resume: finished runs are skipped; one that was not evaluated is evaluated again in its own MLflow run
    models = {p: p.stat().st_mtime_ns for p in (folder / "finetune").glob("*/*/model.pt")}
    st = folder / "finetune" / "scratch" / "b2-s1" / "state.json"
    s = json.loads(st.read_text())
    s["evaluated"] = False
    st.write_text(json.dumps(s))
    n_runs = len(client.search_runs([client.get_run(parent).info.experiment_id]))
    with caplog.at_level(logging.INFO, logger="medhybrid"):
        again = run_ablation(cfg)
    assert again["parent_run_id"] == parent
    assert sum("already done, skipped" in r.getMessage() for r in caplog.records) == 5
    assert sum("scratch b2 s1 test dice" in r.getMessage() for r in caplog.records) == 1
    assert len(client.search_runs([client.get_run(parent).info.experiment_id])) == n_runs  # nothing new, nothing merged
    assert {p: p.stat().st_mtime_ns for p in models} == models  # no fine-tune trained again

    # wall time per invocation, method and stage; the report states the total
    inv = json.loads((folder / "timings.json").read_text())["invocations"]
    assert len(inv) == 2  # the stages of an invocation happen inside its wall time (no timing compared across runs)
    assert [i["finished"] for i in inv] == [True, True]
    assert all(i["wall_s"] >= sum(sum(m.values()) for m in i["methods"].values()) > 0 for i in inv)
    assert set(inv[0]["methods"]) == set(methods) and inv[0]["methods"]["diffusion"]["pretrain_s"] > 0
    assert set(inv[1]["methods"]["scratch"]) == {"pretrain_s", "train_s", "eval_s"}  # the one re-evaluated run
    assert "Wall time:" in again["report"]["markdown"].read_text()


def test_a_killed_invocation_keeps_its_timings(tmp_path, monkeypatch):
    """On a scripted clock: a stage's seconds and the invocation's wall time as the clock read them, written after
    every stage, so a killed invocation keeps what it spent; the resumed one appends its own entry."""
    import time
    import types

    from medhybrid.experiments import ablation
    from medhybrid.experiments.ablation import _Timings

    clock = types.SimpleNamespace(now=100.0)
    monkeypatch.setattr(ablation, "time", types.SimpleNamespace(perf_counter=lambda: clock.now, strftime=time.strftime))
    first = _Timings(tmp_path)
    clock.now = 101.0
    with first("supervised", "pretrain_s"):
        clock.now = 103.5
    (kept,) = json.loads((tmp_path / "timings.json").read_text())["invocations"]
    assert kept["methods"] == {"supervised": {"pretrain_s": 2.5}} and kept["wall_s"] == 3.5
    clock.now = 110.0
    first.add("supervised", train_s=12.5)  # then the process is killed: save() never runs
    (kept,) = json.loads((tmp_path / "timings.json").read_text())["invocations"]
    assert kept["finished"] is False and kept["wall_s"] == 10.0
    assert kept["methods"] == {"supervised": {"pretrain_s": 2.5, "train_s": 12.5}}
    clock.now = 200.0
    second = _Timings(tmp_path)  # the resumed invocation appends its own entry after the killed one
    second.add("hybrid", train_s=3.0)
    second.add("hybrid", train_s=1.0, eval_s=2.0)  # a fine-tune's two stages, one write
    clock.now = 207.25
    assert second.save() == 7.25
    inv = json.loads((tmp_path / "timings.json").read_text())["invocations"]
    assert [(i["finished"], i["wall_s"], i["methods"]) for i in inv] == [
        (False, 10.0, {"supervised": {"pretrain_s": 2.5, "train_s": 12.5}}),
        (True, 7.25, {"hybrid": {"train_s": 4.0, "eval_s": 2.0}})]


def test_target_image_methods_pretrain_on_the_pool_never_the_test_split(workdir, mlflow_uri, isic_tiny):
    from medhybrid.data.unlabelled import source_items
    from medhybrid.workflows.pretrain import training_data

    methods = {"hybrid": {"pretrain": "hybrid"}, "hybrid-target": {"pretrain": "hybrid", "target_images": "add"},
               "mdm-self": {"pretrain": "mdm", "target_images": "only"}}
    cfg = _config(workdir, mlflow_uri, isic_tiny, methods, seeds=(0,))
    cfg.pretrain["unlabelled"] = {"share": 0.25}
    assert pretrain_config(cfg, "hybrid").unlabelled is None  # the shared share brings no images by itself
    pool, test = ({p["image"] for p in load_pairs(cfg.target, s)} for s in ("pool", "test"))
    add, only = pretrain_config(cfg, "hybrid-target"), pretrain_config(cfg, "mdm-self")
    assert add.dataset.name == "isic_tiny" and add.unlabelled.share == 0.25 and only.dataset is None
    for pcfg in (add, only):
        images = {i["image"] for s in pcfg.unlabelled.sources for i in source_items(s)}
        assert images == pool and not images & test
    mixed, _, sampler = training_data(add)
    assert len(mixed) == 16 + 8 and sampler.per_batch == (3, 1)
    assert pretraining_of(cfg, "hybrid-target") == "hybrid-target"  # not the plain hybrid's network

    out = run_ablation(cfg)
    assert out["failures"] == []
    runs = child_runs(mlflow_uri, out["parent_run_id"])
    assert sorted(r.data.tags["method"] for r in runs) == ["hybrid", "hybrid-target", "mdm-self"]
    for r in runs:  # each recorded Dice is the mean of the run's per-image scores
        recorded = per_image_csv(workdir / "abl" / "finetune" / r.data.tags["method"] / "b2-s0" / "eval" / "per_image.csv")
        assert r.data.metrics["test_dice"] == pytest.approx(np.mean(list(recorded.values())), abs=1e-6)
    # those of the method that pretrains on the pool too are the Dice of the masks its model writes, scored independently
    own = dice_of_written_masks(workdir / "abl" / "finetune" / "hybrid-target" / "b2-s0" / "model.pt",
                                load_pairs(cfg.target, "test"), workdir / "masks")
    assert per_image_csv(workdir / "abl" / "finetune" / "hybrid-target" / "b2-s0" / "eval" / "per_image.csv") == \
        pytest.approx(own, abs=1e-6)
    meta = {m: json.loads((workdir / "abl" / "pretrain" / m / "state.json").read_text())["dataset"] for m in methods}
    assert meta == {"hybrid": "isic_tiny", "hybrid-target": "isic_tiny+ph2_tiny-pool", "mdm-self": "ph2_tiny-pool"}

    # the same runs compared against another reference, written elsewhere (medhybrid report --out)
    import yaml

    from medhybrid.cli import main
    from medhybrid.core.config import dump_config

    spec = workdir / "t.yaml"
    spec.write_text(yaml.safe_dump({**dump_config(cfg), "profiles": {"tiny": {}}}))
    assert main(["report", "--config", str(spec), "--profile", "tiny", "reference=hybrid-target", "--out", str(workdir / "r2")]) == 0
    md = (workdir / "r2" / "report.md").read_text()
    assert "Paired difference `hybrid-target` − baseline" in md and "| hybrid | 2 | 1 |" in md
    assert (workdir / "abl" / "report" / "report.md").read_text() != md

    # per-image scores come from the run folders, else from each run's MLflow artifact: the same report either way
    from medhybrid.experiments.report import write_report

    for f in (workdir / "abl" / "finetune").glob("*/*/eval/per_image.csv"):
        f.unlink()
    again = write_report(cfg, workdir / "r3", parent_run_id=out["parent_run_id"])["markdown"].read_text()
    assert again == (workdir / "abl" / "report" / "report.md").read_text()


# --------------------------------------------------------------------------------------------- on Ray
def test_semi_supervised_methods_never_train_on_a_development_or_test_image(workdir, mlflow_uri, isic_tiny):
    """On pool-holdout, the development set is half the held-out pool: semi-supervised methods read the other half
    (and the largest subset's other images) without masks, never a scored image and never a test image."""

    cfg = _config(workdir, mlflow_uri, isic_tiny, {"supervised": {"pretrain": "supervised"},
                  "supervised-fixmatch": {"pretrain": "supervised", "finetune": {"semi": {"algorithm": "fixmatch"}}}})
    cfg = cfg.model_copy(update={"evaluate_on": "pool-holdout", "budgets": [1, 2]})
    init = save_model(build_network(ModelConfig(**TINY_MODEL), 3), network_meta(
        build_network(ModelConfig(**TINY_MODEL), 3), ModelConfig(**TINY_MODEL), Preprocess(resolution=32), cfg.source,
        "supervised"), workdir / "init" / "model.pt")
    pool = {p["id"] for p in load_pairs(cfg.target, "pool")}
    test = {p["id"] for p in load_pairs(cfg.target, "test")}
    for seed in (0, 1):
        dev = {p["id"] for p in cfg.eval_pairs(seed)}
        assert len(dev) == 3 and dev <= pool  # 8 pool images, 2 in the largest subset, 6 held out, half scored
        semi = finetune_config(cfg, "supervised-fixmatch", init, 1, seed, None, None)
        plain = finetune_config(cfg, "supervised", init, 1, seed, None, None)
        assert set(semi.unlabelled_exclude) == dev and plain.unlabelled_exclude == [] and semi.semi.algorithm == "fixmatch"
        labelled = [p["id"] for p in few_shot_pairs(semi.dataset, 1, seed)]
        unl = {it["id"] for it in unlabelled_items(semi, labelled)}
        assert len(unl) == 4 and not unl & (dev | test | set(labelled)) and unl <= pool


def test_an_adapt_method_carries_its_own_rule_and_menu(workdir, mlflow_uri, isic_tiny):
    """``adapt`` settings of a method reach the run's AdaptConfig (the others keep the defaults); they are refused on
    another head, and the data, model and run stay the ablation's."""
    from types import SimpleNamespace

    from medhybrid.experiments.heads import RunKey, get_head
    from medhybrid.workflows.adapt import AdaptRule

    strict = {"rule": {"min_gain": 0.05}, "wise": [0.5, 1.0], "recipes": {"plain": {}}}
    cfg = _config(workdir, mlflow_uri, isic_tiny, {"hybrid-adapt": {"pretrain": "hybrid", "head": "adapt"},
                                                   "hybrid-strict": {"pretrain": "hybrid", "head": "adapt", "adapt": strict}})
    pre = SimpleNamespace(checkpoint=workdir / "pre" / "model.pt", run_id="r")
    default, custom = (get_head("adapt").config(cfg, RunKey(m, 2, 0), pre, None) for m in ("hybrid-adapt", "hybrid-strict"))
    assert default.rule == AdaptRule() and default.wise == (0.25, 0.5, 0.75, 1.0)
    assert set(default.recipes) == {"plain", "robust", "fixmatch"}
    assert custom.rule.min_gain == 0.05 and custom.rule.min_share == AdaptRule().min_share
    assert custom.wise == (0.5, 1.0) and list(custom.recipes) == ["plain"]
    assert custom.labelled == default.labelled and custom.output_dir.name == default.output_dir.name == "b2-s0"
    with pytest.raises(ConfigError, match="adapt settings are for head adapt, not head 'finetune'"):
        _config(workdir, mlflow_uri, isic_tiny, {"hybrid": {"pretrain": "hybrid", "adapt": strict}})
    with pytest.raises(ConfigError, match=r"adapt settings \['labelled'\] cannot be set per method"):
        _config(workdir, mlflow_uri, isic_tiny, {"x": {"pretrain": "hybrid", "head": "adapt", "adapt": {"labelled": ["a"]}}})


@pytest.mark.slow
def test_two_ablations_started_together_on_one_folder(workdir, mlflow_uri, isic_tiny):
    """The same ``medhybrid ablate`` twice at once: one runs the ablation, the other stops at once in one line, and
    every (method, budget, seed) is fine-tuned once, in one MLflow run each under one parent."""
    import subprocess
    import sys

    import yaml
    from conftest import REPO_ROOT

    target = ph2_yaml(workdir / "datasets", n_pool=6, n_test=2)
    conf = workdir / "tiny.yaml"
    conf.write_text(yaml.safe_dump({
        "source": str(isic_tiny), "target": str(target), "methods": {"scratch": {"pretrain": "none"}},
        "reference": "scratch", "budgets": [2], "seeds": [0],
        "pretrain": {"preprocess": {"resolution": 32}, "model": {"channels": [16, 32, 32], "attention_levels": [False] * 3}},
        "finetune": {"train": {"batch_size": 2, "warmup_iterations": 0, "device": "cpu", "progress": False, "check_data": False},
                     "schedule": {"per_label": 1, "min_iterations": 40, "max_iterations": 40, "epochs": 1}},
        "mlflow": {"tracking_uri": mlflow_uri}, "output_dir": str(workdir / "abl"), "profiles": {"tiny": {}}}))
    env = dict(__import__("os").environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "medhybrid.cli", "ablate", "--config", str(conf), "--profile", "tiny"]
    procs = [subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append((p.pid, p.returncode, out, err))
    ok = [r for r in results if r[1] == 0]
    refused = [r for r in results if r[1] != 0]
    assert len(ok) == 1 and len(refused) == 1, [(r[1], r[3][-2000:]) for r in results]
    assert "Traceback" not in refused[0][3]
    (line,) = [x for x in refused[0][3].splitlines() if x.startswith("error:")]
    assert f"in use by process {ok[0][0]} on " in line
    c = mlflow_client(mlflow_uri)
    all_runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    parents = [r for r in all_runs if r.data.tags.get("medhybrid.stage") == "ablation"]
    children = [r for r in all_runs if r.data.tags.get("medhybrid.stage") == "finetune"]
    assert len(parents) == 1 and len(children) == 1
    assert children[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id


def test_more_subsets_where_the_subset_moves_dice_most(workdir, mlflow_uri, isic_tiny):
    """``seeds_at`` gives a budget its own seeds: the standard profiles draw 10 labelled subsets at 1 and 2 labels and
    5 elsewhere; the sequential runner fine-tunes exactly those (method, budget, seed)."""
    from medhybrid.experiments.ablation import load_ablation

    for domain in ("dermoscopy", "chest_xray"):
        std = load_ablation(domain, "standard", [])
        assert [len(std.seeds_for(b)) for b in std.budgets] == [10, 10, 5, 5, 5, 5]
    cfg = _config(workdir, mlflow_uri, isic_tiny, {"scratch": {"pretrain": "none"}}, seeds=(0,))
    cfg = cfg.model_copy(update={"budgets": [1, 2], "seeds_at": {1: [0, 1, 2]},
                                 "finetune": {**cfg.finetune, "schedule": {"per_label": 1, "min_iterations": 1,
                                                                           "max_iterations": 1, "epochs": 1}}})
    run_ablation(cfg)
    assert sorted(p.name for p in (cfg.folder / "finetune" / "scratch").iterdir()) == ["b1-s0", "b1-s1", "b1-s2", "b2-s0"]
