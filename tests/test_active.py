"""medhybrid.experiments.active: the uncertainty-vs-random labelling experiment (the score itself: test_quality.py)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import TINY_UNET as TINY
from conftest import child_runs, ph2_yaml

from medhybrid.core.config import ConfigError, validate
from medhybrid.data.datasets import few_shot_ids, load_pairs
from medhybrid.experiments.ablation import AblationConfig
from medhybrid.experiments.active import (
    ActiveLearningConfig,
    density_weighted,
    embed_images,
    information_density,
    most_uncertain,
    run_active_learning,
)
from medhybrid.networks.nets import build_network
from medhybrid.workflows.quality import UncertaintyConfig

pytestmark = pytest.mark.usefixtures("workdir")


def test_information_density_is_low_for_an_outlier_and_weights_the_scores():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.05], [-1.0, 0.2]]), dim=1)
    d = information_density(emb)
    assert d.argmin().item() == 3 and ((d >= 0) & (d <= 1)).all()
    w = density_weighted({"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.25}, beta=1.0)
    assert w == {"a": 0.5, "b": 0.125} and density_weighted({"a": 0.5}, {"a": 0.25}, beta=0.0) == {"a": 0.5}
    torch.manual_seed(0)
    net = build_network(TINY, 3, 2)
    e = embed_images(net, [torch.rand(3, 32, 32) for _ in range(3)], batch_size=2)
    assert e.shape == (3, 32) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)


def test_most_uncertain_is_deterministic_and_skips_labelled():
    scores = {"a": 0.1, "b": 0.5, "c": 0.5, "d": 0.9}
    assert most_uncertain(scores, 2) == ["d", "b"]
    assert most_uncertain(scores, 2, exclude=["d"]) == ["b", "c"]
    assert most_uncertain(scores, 10, exclude=["a", "b", "c", "d"]) == []


def test_config_needs_increasing_budgets():
    with pytest.raises(ConfigError, match="increasing"):
        validate(ActiveLearningConfig, {"budgets": [5, 2]})
    with pytest.raises(ConfigError, match="increasing"):
        validate(ActiveLearningConfig, {"budgets": [0, 2]})


def _tiny_ablation(workdir, mlflow_uri, isic_tiny) -> AblationConfig:
    target = ph2_yaml(workdir / "datasets", n_pool=8, n_test=4)
    cpu = {"device": "cpu", "check_data": False, "progress": False}
    return validate(AblationConfig, {
        "name": "t", "source": str(isic_tiny), "target": str(target), "methods": {"hybrid": {"pretrain": "hybrid"}},
        "output_dir": str(workdir / "abl"),
        "pretrain": {"preprocess": {"resolution": 32}, "model": {"channels": [16, 32, 32], "attention_levels": [False] * 3},
                     "train": {"batch_size": 4, "epochs": 1, "epoch_length": 4, "lr": 1e-3, "warmup_iterations": 0,
                               "val_max_images": 4, **cpu}},
        "finetune": {"train": {"batch_size": 2, "lr": 1e-3, "warmup_iterations": 0, **cpu},
                     "schedule": {"per_label": 1, "min_iterations": 3, "max_iterations": 3, "epochs": 1}},
        "mlflow": {"tracking_uri": mlflow_uri}}, context={"base_dir": str(workdir)})


def test_experiment_labels_in_uncertainty_order_and_compares_with_random(workdir, mlflow_uri, isic_tiny):
    abl = _tiny_ablation(workdir, mlflow_uri, isic_tiny)
    cfg = ActiveLearningConfig(budgets=[1, 3], seeds=[0], uncertainty=UncertaintyConfig(sigmas=(0.1,), repeats=1))
    out = run_active_learning(abl, cfg)
    folder = workdir / "abl" / "active-learning" / "hybrid"
    rows = list(csv.DictReader(open(out["csv"])))
    assert [(r["strategy"], r["budget"]) for r in rows] == [("random", "1"), ("random", "3"), ("uncertainty", "1"), ("uncertainty", "3")]
    pool = [p["id"] for p in load_pairs(abl.target, "pool")]
    test = {p["id"] for p in load_pairs(abl.target, "test")}
    for r in rows:
        ids = r["ids"].split()
        assert len(ids) == int(r["budget"]) and set(ids) <= set(pool) and not set(ids) & test  # never a test image
        assert 0 <= float(r["test_dice"]) <= 1
    assert rows[1]["ids"].split() == few_shot_ids(pool, 3, 0)
    rho = [float(r["score_error_rho"]) for r in rows]
    assert math.isnan(rho[0]) and math.isnan(rho[1])  # the score-vs-error diagnostic is for the uncertainty rounds
    assert all(-1 <= v <= 1 for v in rho[2:] if not math.isnan(v))
    # round 1: the most uncertain pool image under the pretrained model; round 2: two more, rescored after fine-tuning
    s1 = json.loads((folder / "uncertainty" / "b1-s0" / "scores.json").read_text())
    s3 = json.loads((folder / "uncertainty" / "b3-s0" / "scores.json").read_text())
    assert set(s1) == set(pool) and rows[2]["ids"].split() == most_uncertain(s1, 1)
    first = rows[2]["ids"].split()
    assert rows[3]["ids"].split() == first + most_uncertain(s3, 2, exclude=first)
    subset = json.loads((folder / "uncertainty" / "b3-s0" / "subset.json").read_text())
    assert subset["ids"] == rows[3]["ids"].split()  # the fine-tune used exactly the chosen images
    report = out["markdown"].read_text()
    assert "uncertainty - random" in report and "| 3 |" in report and "test split" in report and out["plot"].stat().st_size > 0
    runs = child_runs(mlflow_uri, out["parent_run_id"])
    assert sorted((r.data.tags["strategy"], r.data.tags["budget"]) for r in runs) == [
        ("random", "1"), ("random", "3"), ("uncertainty", "1"), ("uncertainty", "3")]
    assert all("test_dice" in r.data.metrics for r in runs)
    # resumable: a second call trains nothing and rebuilds the same table
    again = run_active_learning(abl, cfg)
    assert [r["dice"] for r in again["rows"]] == [float(r["test_dice"]) for r in rows]


def test_development_set_is_never_selected_and_density_runs(workdir, mlflow_uri, isic_tiny):
    abl = _tiny_ablation(workdir, mlflow_uri, isic_tiny)
    cfg = ActiveLearningConfig(budgets=[1, 2], seeds=[0], strategies=["random", "density"], evaluate_on="pool-holdout", holdout=3,
                               uncertainty=UncertaintyConfig(sigmas=(0.1,), repeats=1))
    out = run_active_learning(abl, cfg)
    pool = [p["id"] for p in load_pairs(abl.target, "pool")]
    dev = set(few_shot_ids(pool, 3, 10_000))
    for r in out["rows"]:
        assert not set(r["ids"].split()) & dev  # the development images are never labelled
    folder = workdir / "abl" / "active-learning" / "hybrid-pool-holdout"
    per_image = folder / "density" / "b2-s0" / "eval" / "per_image.csv"
    assert {row["id"] for row in csv.DictReader(open(per_image))} == dev  # and they are what every run is scored on
    report = out["markdown"].read_text()
    assert "development set" in report and "density - random" in report
