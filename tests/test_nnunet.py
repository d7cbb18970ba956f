"""medhybrid.experiments.nnunet: nnU-Net v2 on the same labelled subsets as every other method, scored by medhybrid's evaluator."""

from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
import pytest
from conftest import PH2, REPO_ROOT, isic_yaml, mlflow_client, ph2_yaml, real_split
from PIL import Image

from medhybrid.core.config import validate
from medhybrid.data.datasets import few_shot_ids
from medhybrid.experiments.ablation import AblationConfig, run_ablation

TRAINER = "nnunet_trainers.nnUNetTrainer_40iterations"


@pytest.mark.slow(seconds=90)
def test_nnunet_in_the_ablation_trains_on_the_subset_and_is_scored_at_native_resolution(workdir, mlflow_uri, monkeypatch,
                                                                                      caplog):
    """The ``nnunet`` method on real PH2 images: nnU-Net plans, trains and predicts in its own process on exactly the
    seeded labelled subset (never a test image), its masks are scored at native resolution by medhybrid's evaluator,
    it is one MLflow child run like any other method and the report says which trainer ran; run again, it is skipped."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    target = ph2_yaml(workdir / "datasets", n_pool=8, n_test=3)
    cfg = validate(AblationConfig, {
        "name": "nn", "source": str(isic_yaml(workdir / "datasets", n_train=4, n_val=2)), "target": str(target),
        "methods": {"nnunet": {"pretrain": "none", "head": "nnunet"}}, "reference": "nnunet", "budgets": [2], "seeds": [0],
        "output_dir": str(workdir / "abl"), "pretrain": {"preprocess": {"resolution": 32}},
        "nnunet": {"trainer": TRAINER, "device": "cpu"}, "mlflow": {"tracking_uri": mlflow_uri}},
        context={"base_dir": str(workdir)})
    out = run_ablation(cfg)
    assert out["failures"] == []
    run = workdir / "abl" / "finetune" / "nnunet" / "b2-s0"
    pool, test = real_split(PH2)["pool"][:8], real_split(PH2)["test"][:3]
    labelled = few_shot_ids(pool, 2, 0)
    assert json.loads((run / "subset.json").read_text())["ids"] == labelled
    raw = next((run / "nnUNet_raw").iterdir())
    assert sorted(p.name for p in (raw / "labelsTr").iterdir()) == sorted(f"{i}.png" for i in labelled)
    assert sorted(p.name for p in (raw / "imagesTs").iterdir()) == sorted(f"{i}_0000.png" for i in test)
    assert Image.open(raw / "imagesTr" / f"{labelled[0]}_0000.png").size == (32, 24)  # 384x288 at 32 px, aspect kept
    assert set(np.unique(np.asarray(Image.open(raw / "labelsTr" / f"{labelled[0]}.png")))) == {0, 1}
    assert (run / "nnunet.log").read_text().count("Epoch 0") == 1  # one epoch of the 40-iteration trainer
    assert (run / "nnUNet_results" / raw.name / "nnUNetTrainer_40iterations__nnUNetPlans__2d" / "fold_all" /
            "checkpoint_final.pth").is_file()

    with open(run / "eval" / "per_image.csv") as fh:
        scores = {r["id"]: float(r["dice"]) for r in csv.DictReader(fh)}
    assert sorted(scores) == sorted(test)  # every test image, at native size, never a labelled one
    assert np.mean(list(scores.values())) > 0.5  # 40 iterations on 2 labels: far from chance on PH2 lesions
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "finished" and state["scored_on"] == "test"
    assert state["scores"]["test_dice"] == pytest.approx(np.mean(list(scores.values())), abs=1e-6)
    c = mlflow_client(mlflow_uri)
    child = c.get_run(state["mlflow_run_id"])
    assert child.data.tags["method"] == "nnunet" and child.data.tags["mlflow.parentRunId"] == out["parent_run_id"]
    assert child.data.metrics["test_dice"] == pytest.approx(state["scores"]["test_dice"])
    md = out["report"]["markdown"].read_text()
    assert "| nnunet |" in md and f"with `{TRAINER}` — a shortened schedule" in md and "at 32 px on the longer side" in md

    caplog.set_level(logging.INFO, logger="medhybrid")
    again = run_ablation(cfg)
    assert again["failures"] == [] and any("nnunet b2 s0 already done, skipped" in r.getMessage() for r in caplog.records)
