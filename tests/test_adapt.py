"""medhybrid.workflows.adapt: the decision rule, the folds, and real adaptations of the shipped dermoscopy bundle to a
folder of real PH2 images (``medhybrid adapt``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PH2, run_bundle
from PIL import Image

from medhybrid.networks.checkpoints import interpolate_weights, load_model, read_model_file
from medhybrid.workflows.adapt import KEEP, AdaptRule, decide, fold_split

pytestmark = pytest.mark.usefixtures("workdir")

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "dermoscopy_lesion_segmentation"
FAST = ["finetune.schedule.min_iterations=2", "finetune.schedule.max_iterations=2", "finetune.schedule.epochs=1",
        "finetune.train.warmup_iterations=0", "finetune.augment.enabled=false"]


# --------------------------------------------------------------------------------------------- the rule
def test_a_better_start_is_kept_and_a_better_fine_tune_chosen():
    rule = AdaptRule()
    start = [0.90, 0.92, 0.88]
    worse = decide(start, {"plain": [0.80, 0.85, 0.90], "robust": [0.89, 0.91, 0.87]}, rule)
    assert worse.choice == KEEP and "kept the start" in worse.reason
    better = decide(start, {"plain": [0.93, 0.95, 0.91], "robust": [0.95, 0.96, 0.86]}, rule)
    assert better.choice == "plain"  # robust has the higher mean but gains in 2 of 3 folds only... and its mean
    # gain (+0.023) passes too: the highest mean held-out Dice among the qualifying ones wins
    means = {c["name"]: c["dice"] for c in better.candidates}
    assert means["robust"] == pytest.approx(np.mean([0.95, 0.96, 0.86]))


def test_the_rule_needs_the_gain_in_most_folds_and_above_the_margin():
    rule = AdaptRule(min_gain=0.01, min_share=2 / 3)
    start = [0.5, 0.5, 0.5]
    one_fold = decide(start, {"plain": [0.9, 0.49, 0.49]}, rule)  # mean +0.127 but positive in 1 of 3 folds
    assert one_fold.choice == KEEP
    tiny = decide(start, {"plain": [0.505, 0.505, 0.505]}, rule)  # positive everywhere, +0.005 < 0.01
    assert tiny.choice == KEEP
    both = decide(start, {"plain": [0.52, 0.52, 0.49]}, rule)  # +0.01, 2 of 3 folds
    assert both.choice == "plain"
    c = next(c for c in both.candidates if c["name"] == "plain")
    assert c["gain"] == pytest.approx(0.01) and c["positive_share"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="folds"):
        decide(start, {"plain": [0.5, 0.5]}, rule)


def test_every_label_is_held_out_exactly_once():
    ids = [f"i{n}" for n in range(23)]
    assert fold_split(ids[:10], 10, 5, 0) == [[i] for i in ids[:10]]  # leave-one-out up to max_loo
    folds = fold_split(ids, 10, 5, 0)
    assert len(folds) == 5 and sorted(i for f in folds for i in f) == sorted(ids)
    assert all(4 <= len(f) <= 5 for f in folds)
    assert folds == fold_split(ids, 10, 5, 0) and folds != fold_split(ids, 10, 5, 1)  # seeded


# --------------------------------------------------------------------------------------------- real adaptations
def test_an_adaptation_is_the_same_run_on_restored_data_and_another_one_on_other_labels(tiny_dataset, tiny_spec, tmp_path):
    """The run identity behind resuming: a data folder whose files were copied or restored (new modification times,
    same bytes) is the same adaptation, so its run resumes; another mask, another start or another unlabelled image
    make it another adaptation."""
    import os

    from medhybrid.workflows.adapt import AdaptConfig, _identity

    start = tmp_path / "start.pt"
    start.write_bytes(b"weights")
    extra = tmp_path / "more.png"
    shutil.copy(PH2 / "images" / "IMD008.png", extra)
    cfg = AdaptConfig(model=start, data=tiny_spec, unlabelled_images=[str(extra)])
    before = _identity(cfg, start)
    for f in [*tiny_dataset.rglob("*.png"), extra]:
        os.utime(f, (1e9, 1e9))
    assert _identity(cfg, start) == before
    mask = tiny_dataset / "masks" / "IMD003_lesion.png"
    arr = np.asarray(Image.open(mask)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(mask)
    assert _identity(cfg, start) != before
    shutil.copy(PH2 / "masks" / "IMD003_lesion.png", mask)
    assert _identity(cfg, start) == before
    start.write_bytes(b"other weights")
    assert _identity(cfg, start) != before
    start.write_bytes(b"weights")
    assert _identity(cfg.model_copy(update={"unlabelled_images": []}), start) != before


def _user_folder(root: Path, labelled: list[str], unlabelled: list[str]) -> Path:
    """A user's folder as the README describes it: images/ and masks/ (masks named like their images, 0/255 PNG)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in labelled + unlabelled:
        shutil.copy(PH2 / "images" / f"{i}.png", root / "images" / f"{i}.png")
    for i in labelled:
        shutil.copy(PH2 / "masks" / f"{i}_lesion.png", root / "masks" / f"{i}.png")
    return root


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred > 0, truth > 127
    return float(2 * (p & t).sum() / max(1, p.sum() + t.sum()))


@pytest.mark.slow(seconds=120)
def test_adapt_on_real_images_checks_itself_without_training_on_what_it_holds_out(tmp_path, mlflow_uri, monkeypatch):
    """``medhybrid adapt`` with the shipped dermoscopy bundle on 3 labelled and 2 unlabelled PH2 images: the start is
    scored on every label (as an independent computation on ``medhybrid infer``'s masks finds), every fold holds one
    label out and never trains on it (not even unlabelled), every candidate of the menu is scored, the decision follows
    the rule on the report's numbers, and model.pt, report.md and the MLflow runs exist."""
    from medhybrid.cli import main
    from medhybrid.workflows.inference import infer_files

    labelled, unlabelled = ["IMD003", "IMD004", "IMD006"], ["IMD002", "IMD008"]
    data = _user_folder(tmp_path / "mine", labelled, unlabelled)
    out = tmp_path / "adapted"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    assert main(["adapt", "--model", str(BUNDLE), "--data", str(data), "--output", str(out), *FAST]) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == 3 and report["folds"] == [[i] for i in labelled]
    # the start's Dice on each label, against an independent computation on the bundle's own masks
    infer_files(BUNDLE, [data / "images" / f"{i}.png" for i in labelled], tmp_path / "masks", quality=False)
    for i in labelled:
        pred = np.asarray(Image.open(tmp_path / "masks" / f"{i}_mask.png"))
        truth = np.asarray(Image.open(data / "masks" / f"{i}.png"))
        assert report["start_per_image"][i] == pytest.approx(_dice(pred, truth), abs=1e-6)
    # the menu: start + 3 recipes (FixMatch, since there are unlabelled images) x 4 mixing weights
    names = {c["name"] for c in report["candidates"]}
    assert names == {KEEP} | {f"{r}{'' if a == 1 else f'-wise{a:g}'}" for r in ("plain", "robust", "fixmatch")
                              for a in (0.25, 0.5, 0.75, 1.0)}
    # no fold trains on its held-out image, not even as an unlabelled one
    for recipe in ("plain", "robust", "fixmatch"):
        for f, held in enumerate(report["folds"]):
            folder = out / "work" / "folds" / recipe / f"f{f}"
            trained = json.loads((folder / "subset.json").read_text())["ids"]
            assert set(trained) == set(labelled) - set(held)
            cfg = yaml.safe_load((folder / "config.yaml").read_text())
            assert set(held) <= set(cfg["unlabelled_exclude"])
            assert set(cfg["unlabelled_images"]) == {str((data / "images" / f"{i}.png").resolve()) for i in unlabelled}
    # the decision follows the rule on the report's own numbers
    start = [report["start_per_image"][f[0]] for f in report["folds"]]
    rule = AdaptRule(**report["rule"])
    again = decide(start, {c["name"]: c_folds for c in report["candidates"] if c["name"] != KEEP
                           for c_folds in [_per_fold(out, c["name"], report["folds"])]}, rule)
    assert again.choice == report["decision"]
    assert f"**Decision: {report['decision']}.**" in (out / "report.md").read_text()
    meta = read_model_file(out / "model.pt")["meta"]
    assert meta["adapt"]["decision"] == report["decision"] and meta["adapt"]["labels"] == 3
    # one MLflow run, the fold and final fine-tunes its children
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    state = json.loads((out / "state.json").read_text())
    parent = client.get_run(state["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["medhybrid.stage"] == "adapt"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) >= 9


def _per_fold(out: Path, name: str, folds: list[list[str]]) -> list[float]:
    per = json.loads((out / "report.json").read_text())["per_fold"]
    return per[name]


@pytest.mark.slow(seconds=40)
def test_one_label_trains_the_robust_recipe_and_a_strict_rule_keeps_the_start(tmp_path):
    """k = 1: no held-out check; the model is the documented choice for one label, the robust recipe (L2-SP) trained
    on it, bit for bit, and the report says why. With a rule no candidate can pass, the start is kept: model.pt holds
    its weights."""
    from medhybrid.cli import main

    data = _user_folder(tmp_path / "one", ["IMD003"], [])
    out = tmp_path / "one-out"
    assert main(["adapt", "--model", str(BUNDLE), "--data", str(data), "--output", str(out), *FAST, "mlflow.enabled=false"]) == 0
    adapted, meta = load_model(out / "model.pt")
    rule = AdaptRule()  # the documented one-label choice: the robust recipe, mixed with the start at single_label_wise
    assert rule.single_label_recipe == "robust" and 0 < rule.single_label_wise <= 1
    mixed = "" if rule.single_label_wise == 1 else f"-wise{rule.single_label_wise:g}"
    assert meta["adapt"]["decision"] == f"robust{mixed}" and meta["adapt"]["labels"] == 1
    start, _ = load_model(out / "work" / "start.pt")
    ft, ft_meta = load_model(out / "work" / "final" / "robust" / "model.pt")
    assert ft_meta["robust"] == {"l2sp_alpha": 1.0}
    want = interpolate_weights(start.state_dict(), ft.state_dict(), rule.single_label_wise)
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in want.items())
    assert "one label" in (out / "report.md").read_text()

    data2 = _user_folder(tmp_path / "two", ["IMD003", "IMD004"], [])
    out2 = tmp_path / "two-out"
    assert main(["adapt", "--model", str(BUNDLE), "--data", str(data2), "--output", str(out2), *FAST,
                 "mlflow.enabled=false", "rule.min_gain=2", "recipes={plain: {}}", "wise=[1.0]"]) == 0
    kept, meta2 = load_model(out2 / "model.pt")
    assert meta2["adapt"]["decision"] == KEEP
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in start.state_dict().items())


def test_a_folder_without_labels_is_refused_naming_it(tmp_path, capsys):
    from medhybrid.cli import main

    data = _user_folder(tmp_path / "none", [], ["IMD003"])
    assert main(["adapt", "--model", str(BUNDLE), "--data", str(data), "--output", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert f"{data}: holds no labelled image" in err and not (tmp_path / "x" / "model.pt").exists()


# --------------------------------------------------------------------------------------------- the bundles' train.json
@pytest.mark.slow(seconds=90)
def test_the_bundles_train_json_adapts_and_replaces_its_weights_only_on_the_decision(tmp_path):
    """``train.json`` (``adapt: true``, the default) on a folder of 2 labelled PH2 images, from a copy of the bundle's
    folder: kept (a rule no candidate passes), ``models/model.pt`` is not touched, byte for byte; switched (a rule
    every candidate passes), it holds the chosen fine-tune's weights."""
    import hashlib

    bundle = tmp_path / BUNDLE.name
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "runs"))
    data = _user_folder(tmp_path / "labels", ["IMD003", "IMD004"], [])
    weights = bundle / "models" / "model.pt"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    fast = ["--min_iterations", "2", "--max_iterations", "2", "--dataset_dir", str(data), "--train_split", "None",
            "--semi_algorithm", "none"]
    # a rule no candidate passes stands in for a better start, one every candidate passes for a worse one
    log = run_bundle(bundle, ["train"], *fast, "--adapt_rule", "{'min_gain': 5.0}").log
    report = json.loads((bundle / "eval" / "adapt" / "report.json").read_text())
    assert report["labels"] == 2 and report["decision"] == KEEP and len(report["candidates"]) == 1 + 2 * 4
    assert "model.pt kept as it was" in log and hashlib.sha256(weights.read_bytes()).hexdigest() == before
    log = run_bundle(bundle, ["train"], *fast, "--adapt_rule", "{'min_gain': -5.0, 'min_share': 0.0}").log
    assert "model.pt replaced" in log
    decided = json.loads((bundle / "eval" / "adapt" / "report.json").read_text())["decision"]
    assert decided != KEEP and "model.pt replaced" in log
    adapted = torch.load(bundle / "eval" / "adapt" / "model.pt", weights_only=True)["state_dict"]
    published = torch.load(weights, weights_only=True)
    assert published.keys() == adapted.keys() and all(torch.equal(published[k], adapted[k]) for k in adapted)
