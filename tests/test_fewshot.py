"""medhybrid.workflows.fewshot: a few-shot run's identity, folder, MLflow run and score."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_UNET as TINY

from medhybrid.core import runs
from medhybrid.core.config import ConfigError
from medhybrid.data.datasets import load_pairs
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.networks.nets import build_network
from medhybrid.workflows.fewshot import claim_few_shot_run, evaluate_few_shot_run, few_shot_hash, open_few_shot_run
from medhybrid.workflows.finetune import FinetuneConfig

pytestmark = pytest.mark.usefixtures("workdir")


def _cfg(ph2_tiny, workdir, **kw) -> FinetuneConfig:
    return FinetuneConfig(dataset=str(ph2_tiny), budget=2, seed=0, output_dir=workdir / "run", mlflow={"enabled": False}, **kw)


def test_hash_is_what_the_run_computes(ph2_tiny, workdir):
    """Bookkeeping (folder, MLflow, parent run, tags) leaves the hash alone; the subset and the schedule change it."""
    base = few_shot_hash(_cfg(ph2_tiny, workdir))
    assert few_shot_hash(_cfg(ph2_tiny, workdir, tags={"ablation": "x"}, parent_run_id="abc")) == base
    assert few_shot_hash(_cfg(ph2_tiny, workdir).model_copy(update={"output_dir": workdir / "elsewhere"})) == base
    assert few_shot_hash(_cfg(ph2_tiny, workdir).model_copy(update={"seed": 1})) != base
    assert few_shot_hash(_cfg(ph2_tiny, workdir, schedule={"per_label": 3})) != base


def test_folder_lifecycle(ph2_tiny, workdir):
    """Open writes the resolved config, the subset and the state; a folder of another configuration is refused; a
    finished run with its model file is found, not redone."""
    cfg = _cfg(ph2_tiny, workdir)
    with claim_few_shot_run(cfg) as run:
        assert not run.finished
        assert open_few_shot_run(cfg, run, ["a", "b"]) is None  # MLflow off: no run id
        assert json.loads((cfg.folder / "subset.json").read_text()) == {"budget": 2, "seed": 0, "ids": ["a", "b"]}
        assert (cfg.folder / "config.yaml").is_file() and runs.read_state(cfg.folder)["status"] == "running"
        with pytest.raises(runs.FolderInUse, match="in use by process"):  # the run holds its folder until it ends
            claim_few_shot_run(cfg)
        run.finish([])
    with pytest.raises(ConfigError, match="different configuration"):
        claim_few_shot_run(cfg.model_copy(update={"seed": 3}))
    with claim_few_shot_run(cfg) as again:
        assert not again.finished  # finished, but no model.pt: train it again
    (cfg.folder / "model.pt").write_bytes(b"")
    with claim_few_shot_run(cfg) as again:
        assert again.finished and again.state["status"] == "finished" and again.state["ids"] == ["a", "b"]


def test_scores_name_the_set_they_come_from(ph2_tiny, workdir):
    """Scored on the test split, the run records ``test_*``; scored on pool images (a development set), ``dev_*``:
    a development score is never recorded as a test score."""
    spec = load_dataset_spec(ph2_tiny)
    torch.manual_seed(0)
    net = build_network(TINY, 3, 2)
    pre = Preprocess(resolution=32, aspect="pad")
    cfg = _cfg(ph2_tiny, workdir)
    dev = evaluate_few_shot_run(cfg.mlflow, cfg.folder, None, net, spec, pre, pairs=load_pairs(spec, "pool")[:3])
    assert set(dev) == {"dev_dice", "dev_iou", "dev_hd95", "dev_images"} and dev["dev_images"] == 3
    state = runs.read_state(cfg.folder)
    assert state["evaluated"] and state["scored_on"] == "dev" and state["scores"]["dev_dice"] == dev["dev_dice"]
    test = evaluate_few_shot_run(cfg.mlflow, cfg.folder, None, net, spec, pre)
    assert test["test_images"] == len(load_pairs(spec, "test")) and runs.read_state(cfg.folder)["scored_on"] == "test"
    assert (cfg.folder / "eval" / "per_image.csv").is_file()
