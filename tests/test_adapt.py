"""medhybrid.workflows.adapt: the decision rule, the folds, and real adaptations of the shipped dermoscopy bundle to a
folder of real PH2 images (``medhybrid adapt``)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import OPENIST, PH2, run_bundle
from PIL import Image

from medhybrid.core.files import sha256
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
    assert better.choice == "plain"  # both qualify (robust gains +0.023 on average, in 2 of 3 folds); plain has the
    # higher mean held-out Dice (0.930 against 0.923): the highest mean among the qualifying ones wins
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
    few = fold_split(ids[:3], 2, 5, 0)  # more folds asked than labels: one per label, none empty
    assert sorted(map(len, few)) == [1, 1, 1] and sorted(i for f in few for i in f) == ids[:3]


def test_a_dataset_with_a_test_split_is_adapted_on_its_other_splits_only(tmp_path):
    """``--data ph2`` (a shipped dataset, as a YAML would be): its 100 pool pairs are the labels, its 100 test images
    are left out, with their masks and without; a flat folder of images has no labels, and says so."""
    from medhybrid.data.datasets import load_pairs
    from medhybrid.data.io import DataError
    from medhybrid.data.specs import load_dataset_spec
    from medhybrid.workflows.adapt import folder_dataset

    spec, unlabelled = folder_dataset("ph2", 3, tmp_path / "work")
    test = {p["id"] for p in load_pairs(load_dataset_spec("ph2"), "test")}
    ids = {p["id"] for p in load_pairs(spec, "pool")}
    assert len(ids) == 100 and not ids & test and len(test) == 100 and unlabelled == []
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(PH2 / "images" / "IMD003.png", flat)
    with pytest.raises(DataError, match="holds no labelled image"):
        folder_dataset(flat, 3, tmp_path / "work2")


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
    shutil.copy(PH2 / "images" / "IMD010.png", extra)
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

    labelled, unlabelled = ["IMD003", "IMD004", "IMD009"], ["IMD010", "IMD013"]  # PH2 pool images, as a user's
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


def test_the_one_label_check_reads_the_start_s_sure_errors():
    """With one label: the share of the start's wrong pixels that it is sure of, padding left out; at or above the
    rule's share the robust recipe replaces the start unmixed, below it (or with no error) the start is kept; with
    the check off, the fixed mix."""
    from medhybrid.workflows.adapt import confident_error_share, foreground_probability, single_label_decision

    prob = torch.tensor([[0.95, 0.6, 0.3, 0.02], [0.99, 0.45, 0.97, 0.5]])
    label = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, -1.0, -1.0]])  # -1: padding (IGNORE_INDEX)
    # wrong: 0.95 (sure), 0.6 (unsure), 0.3 (unsure), 0.45 (unsure); 0.97 and 0.5 are padding
    assert confident_error_share(prob, label, 0.9) == pytest.approx(1 / 4)
    assert confident_error_share(prob, label, 0.65) == pytest.approx(2 / 4)  # 0.95 and 0.3 now count as sure
    assert math.isnan(confident_error_share(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0])))
    logits = torch.tensor([[[[2.0]], [[-1.0]]]])  # two classes: background more likely
    assert foreground_probability(logits).item() == pytest.approx(float(torch.softmax(logits, 1)[0, 1]))
    assert foreground_probability(torch.tensor([[[[0.0]]]])).item() == 0.5
    rule = AdaptRule()
    assert single_label_decision(rule, 0.7, []).choice == "robust"
    assert single_label_decision(rule, rule.single_label_check, []).choice == "robust"
    assert single_label_decision(rule, 0.3, []).choice == KEEP
    assert single_label_decision(rule, math.nan, []).choice == KEEP
    fixed = AdaptRule(single_label_check=None)
    assert single_label_decision(fixed, 0.9, []).choice == f"robust-wise{fixed.single_label_wise:g}"


def test_up_to_two_labels_a_switch_also_needs_the_labels_check():
    """With 2 labels a switch the held-out rule allows stands only when the labels' check of the start agrees (the
    share of its wrong pixels it is sure of at least single_label_check); a kept start stays kept; beyond
    label_check_up_to labels, or with the check off, the held-out rule decides alone."""
    from medhybrid.workflows.adapt import Decision, labels_check

    rule = AdaptRule()
    switch = Decision("plain-wise0.25", "plain-wise0.25 gains +0.088", [{"name": KEEP}])
    assert labels_check(rule, 0.7, switch, 2).choice == "plain-wise0.25"
    assert "the labels check the start too: 70%" in labels_check(rule, 0.7, switch, 2).reason
    assert labels_check(rule, rule.single_label_check, switch, 2).choice == "plain-wise0.25"
    kept = labels_check(rule, 0.46, switch, 2)
    assert kept.choice == KEEP and kept.candidates == switch.candidates
    assert "plain-wise0.25 passed the held-out rule" in kept.reason and "46%" in kept.reason
    assert labels_check(rule, math.nan, switch, 2).choice == KEEP
    assert labels_check(rule, 0.1, switch, 3) is switch
    assert labels_check(AdaptRule(label_check_up_to=1), 0.1, switch, 2) is switch
    assert labels_check(AdaptRule(single_label_check=None), 0.1, switch, 2) is switch
    start = Decision(KEEP, "kept the start", [])
    assert labels_check(rule, 0.9, start, 2) is start


@pytest.mark.slow(seconds=60)
def test_one_label_checks_the_start_on_it_and_a_strict_rule_keeps_the_start(tmp_path):
    """k = 1 from the shipped dermoscopy bundle (fitted to PH2) on a PH2 image: the report gives the share of the
    start's wrong pixels it is sure of and the decision follows it; a rule that always switches gives the robust recipe
    (L2-SP) trained on the label, bit for bit; with the check off, that fine-tune mixed with the start at
    single_label_wise. With 2 labels and a rule no candidate can pass, the start is kept: model.pt holds its weights,
    and the report gives the labels' check over both labels."""
    from medhybrid.cli import main

    def adapt(folder, out, *settings):
        assert main(["adapt", "--model", str(BUNDLE), "--data", str(folder), "--output", str(out), *FAST,
                     "mlflow.enabled=false", *settings]) == 0
        return load_model(out / "model.pt")

    data = _user_folder(tmp_path / "one", ["IMD003"], [])
    rule = AdaptRule()
    _, meta = adapt(data, tmp_path / "checked")
    share = json.loads((tmp_path / "checked" / "report.json").read_text())["confident_error_share"]
    assert 0 <= share <= 1 and meta["adapt"]["labels"] == 1
    assert meta["adapt"]["decision"] == ("robust" if share >= rule.single_label_check else KEEP)
    assert f"{share:.0%} of the pixels it gets wrong" in (tmp_path / "checked" / "report.md").read_text()

    out = tmp_path / "switched"
    adapted, meta = adapt(data, out, "rule.single_label_check=0")
    start, start_meta = load_model(next((out / "work").glob("start-*.pt")))
    ft, ft_meta = load_model(out / "work" / "final" / "robust" / "model.pt")
    assert meta["adapt"]["decision"] == "robust" and ft_meta["robust"] == {"l2sp_alpha": 1.0}
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in ft.state_dict().items())

    out = tmp_path / "mixed"
    adapted, meta = adapt(data, out, "rule.single_label_check=null")
    assert meta["adapt"]["decision"] == f"robust-wise{rule.single_label_wise:g}"
    ft, _ = load_model(out / "work" / "final" / "robust" / "model.pt")
    want = interpolate_weights(start.state_dict(), ft.state_dict(), rule.single_label_wise)
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in want.items())
    assert "one label" in (out / "report.md").read_text()

    data2 = _user_folder(tmp_path / "two", ["IMD003", "IMD004"], [])
    kept, meta2 = adapt(data2, tmp_path / "two-out", "rule.min_gain=2", "recipes={plain: {}}", "wise=[1.0]")
    assert meta2["adapt"]["decision"] == KEEP
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in start.state_dict().items())
    share2 = json.loads((tmp_path / "two-out" / "report.json").read_text())["confident_error_share"]
    assert 0 <= share2 <= 1  # with 2 labels the labels' check is computed and reported, over both labels' pixels
    assert f"the labels also check the start: on them, {share2:.0%} of the pixels it gets wrong" in (
        tmp_path / "two-out" / "report.md").read_text()
    # the start's own share, pooled over both labels' pixels, as computed apart from the adaptation
    from medhybrid.data.datasets import load_pairs
    from medhybrid.data.specs import Preprocess
    from medhybrid.workflows.adapt import folder_dataset, start_confident_errors

    spec, _ = folder_dataset(data2, 3, tmp_path / "spec")
    pool = load_pairs(spec, "pool")
    pre = Preprocess(**start_meta["preprocess"])
    want = start_confident_errors(start, spec, pre, pool, rule.sure)
    assert share2 == pytest.approx(want, abs=1e-9) and meta2["adapt"]["confident_error_share"] == share2
    alone = [start_confident_errors(start, spec, pre, [p], rule.sure) for p in pool]
    assert min(alone) <= share2 <= max(alone)
    # a switch the held-out rule allows, refused by a labels' check no share can pass, and let through without it
    switch = ("rule.min_gain=-5", "rule.min_share=0", "rule.single_label_check=1.0", "recipes={plain: {}}", "wise=[1.0]")
    assert share2 < 1
    vetoed, meta3 = adapt(data2, tmp_path / "two-vetoed", *switch)
    assert meta3["adapt"]["decision"] == KEEP and "plain passed the held-out rule" in meta3["adapt"]["reason"]
    assert all(torch.equal(vetoed.state_dict()[k], v) for k, v in start.state_dict().items())
    _, meta4 = adapt(data2, tmp_path / "two-unchecked", *switch, "rule.label_check_up_to=1")
    assert meta4["adapt"]["decision"] == "plain"


def test_a_folder_without_labels_is_refused_naming_it(tmp_path, capsys):
    from medhybrid.cli import main

    data = _user_folder(tmp_path / "none", [], ["IMD003"])
    assert main(["adapt", "--model", str(BUNDLE), "--data", str(data), "--output", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert f"{data}: holds no labelled image" in err and not (tmp_path / "x" / "model.pt").exists()


def test_an_unreadable_unlabelled_image_is_named_before_anything_trains(tmp_path, capsys):
    from medhybrid.cli import main

    data = _user_folder(tmp_path / "mine", ["IMD003", "IMD004"], ["IMD009"])
    broken = data / "images" / "IMD009.png"
    broken.write_bytes(broken.read_bytes()[:600])
    out = tmp_path / "x"
    assert main(["adapt", "--model", str(BUNDLE), "--data", str(data), "--output", str(out), "mlflow.enabled=false"]) != 0
    err = capsys.readouterr().err
    assert "1 unlabelled image(s) cannot be read" in err and str(broken.resolve()) in err
    assert not (out / "work" / "folds").exists() and not (out / "model.pt").exists()


# --------------------------------------------------------------------------------------------- the bundles' train.json
FAST_BUNDLE = ["--min_iterations", "2", "--max_iterations", "2", "--train_split", "None", "--semi_algorithm", "none"]
KEEPS, SWITCHES = "{'min_gain': 5.0}", "{'min_gain': -5.0, 'min_share': 0.0, 'single_label_check': 0.0}"
"""A rule no candidate passes stands in for a better start, one every candidate passes for a worse one."""


@pytest.mark.slow(seconds=60)
def test_the_bundles_train_json_keeps_its_weights_untouched_when_the_start_wins(tmp_path):
    """``train.json`` (``adapt: true``, the default) on a folder of 2 labelled PH2 images, from a copy of the bundle's
    folder, pointed at the source's labelled images for rehearsal: the menu holds the rehearsal candidate, whose folds
    draw from ISIC's train split; kept, ``models/model.pt`` is not touched, byte for byte, and the outcome says so.
    Rehearsal without the check is refused, naming the setting."""
    bundle = tmp_path / BUNDLE.name
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "runs"))
    data = _user_folder(tmp_path / "labels", ["IMD003", "IMD004"], [])
    weights = bundle / "models" / "model.pt"
    before = sha256(weights)
    log = run_bundle(bundle, ["train"], *FAST_BUNDLE, "--dataset_dir", str(data), "--adapt_rule", KEEPS,
                     "--rehearsal_dataset", "isic2018").log
    report = json.loads((bundle / "eval" / "adapt" / "report.json").read_text())
    assert report["labels"] == 2 and report["decision"] == KEEP and len(report["candidates"]) == 1 + 3 * 4
    fold = next((bundle / "eval" / "adapt" / "runs").iterdir()) / "work" / "folds" / "rehearsal" / "f0"
    rehearsed = yaml.safe_load((fold / "config.yaml").read_text())["robust"]["rehearsal"]
    assert rehearsed["dataset"]["name"] == "isic2018" and rehearsed.get("splits", ["train"]) == ["train"]
    outcome = json.loads((bundle / "eval" / "adapt" / "outcome.json").read_text())
    assert outcome["decision"] == KEEP and outcome["replaced"] is False and outcome["start"] == str(weights)
    assert "model.pt kept as it was" in log and sha256(weights) == before
    assert not (bundle / "models" / "model.base.pt").exists()
    refused = run_bundle(bundle, ["train"], *FAST_BUNDLE, "--dataset_dir", str(data), "--adapt", "False",
                         "--rehearsal_dataset", "isic2018", check=False)
    assert refused.returncode != 0 and "rehearsal_dataset 'isic2018': source rehearsal is a candidate" in refused.log
    assert sha256(weights) == before


@pytest.mark.slow(seconds=90)
def test_an_adapted_bundle_adapts_again_from_the_weights_it_started_from(tmp_path, capsys):
    """The chest X-ray bundle (masks read by threshold) on 2 labelled OpenIST images, as MONAI Label's train task
    runs it again and again as labels are saved:

    1. a fine-tune wins: ``models/model.pt`` holds it, the served weights it replaced are kept as
       ``models/model.base.pt``, and the note says which images it was adapted on;
    2. ``medhybrid adapt`` refuses to start from it on those labels (it would be scored on images it trained on);
    3. ``train.json`` again, the start winning this time: it started from the base, not from the adapted weights,
       and ``models/model.pt`` holds the base's weights again."""
    from medhybrid.cli import main
    from medhybrid.networks.checkpoints import weights_note

    chest = BUNDLE.parent / "chest_xray_lung_segmentation"
    bundle = tmp_path / chest.name
    shutil.copytree(chest, bundle, ignore=shutil.ignore_patterns("eval", "runs"))
    data = tmp_path / "labels"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in ("10-19", "106-115"):
        shutil.copy(OPENIST / "images" / f"{i}.jpg", data / "images" / f"{i}.jpg")
        shutil.copy(OPENIST / "masks" / f"{i}_mask.png", data / "masks" / f"{i}.png")
    weights, base = bundle / "models" / "model.pt", bundle / "models" / "model.base.pt"
    served = sha256(weights)
    shipped = torch.load(weights, weights_only=True)

    log = run_bundle(bundle, ["train"], *FAST_BUNDLE, "--dataset_dir", str(data), "--adapt_rule", SWITCHES).log
    decided = json.loads((bundle / "eval" / "adapt" / "report.json").read_text())["decision"]
    assert decided != KEEP and "model.pt replaced" in log
    adapted = torch.load(bundle / "eval" / "adapt" / "model.pt", weights_only=True)["state_dict"]
    published = torch.load(weights, weights_only=True)
    assert published.keys() == adapted.keys() and all(torch.equal(published[k], adapted[k]) for k in adapted)
    assert sha256(base) == served
    note = weights_note(weights)
    assert note["base"] == "model.base.pt" and note["base_sha256"] == served and note["decision"] == decided
    assert sorted(note["labels_sha256"]) == sorted(sha256(f) for f in (data / "images").iterdir())

    assert main(["adapt", "--model", str(bundle), "--data", str(data), "--output", str(tmp_path / "again")]) != 0
    assert f"{weights}: was adapted on 2 of these 2 labelled images" in capsys.readouterr().err

    log = run_bundle(bundle, ["train"], *FAST_BUNDLE, "--dataset_dir", str(data), "--adapt_rule", KEEPS).log
    outcome = json.loads((bundle / "eval" / "adapt" / "outcome.json").read_text())
    assert outcome["decision"] == KEEP and outcome["replaced"] is True and outcome["start"] == str(base)
    assert "the weights it started from" in log and "replaced by the start (model.base.pt)" in log
    back = torch.load(weights, weights_only=True)
    assert back.keys() == shipped.keys() and all(torch.equal(back[k], shipped[k]) for k in shipped)
    assert "base" not in weights_note(weights)
