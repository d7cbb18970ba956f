"""The MONAI bundle ``bundles/medhybrid_2d_segmentation``: every workflow run through ``monai.bundle`` on real images
(tiny network, a few iterations), MLflow tracking through the override, and MONAI's bundle checks (metadata schema,
network input/output, TorchScript export)."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PH2, REPO_ROOT, isic_yaml, mlflow_client, ph2_yaml, real_split
from monai.bundle import ConfigParser, ckpt_export, run, verify_metadata, verify_net_in_out
from PIL import Image

from medhybrid.inference import load_segmenter
from medhybrid.io import read_image
from medhybrid.pretrain import load_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning"),  # MONAI's notice that configs run code
    pytest.mark.filterwarnings("ignore:Detected deprecated name 'optional_packages_version':UserWarning"),
    pytest.mark.filterwarnings("ignore:No hash value provided:UserWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

BUNDLE = REPO_ROOT / "bundles" / "medhybrid_2d_segmentation"
CONFIGS = BUNDLE / "configs"
META = CONFIGS / "metadata.json"
SCHEMA = CONFIGS / "schema" / "meta_schema.json"
LOGGING = CONFIGS / "logging.conf"
WORKFLOWS = ("pretrain", "finetune", "evaluate", "inference")

TINY_NET = {"preprocess#resolution": 32, "model#channels": [16, 32, 32], "model#attention_levels": [False, False, False]}
"""Overrides (bundle ids) for the tiny U-Net at 32 px that every training test uses."""
TINY = {**TINY_NET, "device": "cpu"}

PRETRAIN_TINY = {f"pretrain_train#{k}": v for k, v in {"epochs": 2, "epoch_length": 2, "batch_size": 4, "lr": 1e-3, "warmup_iterations": 0,
                                                       "val_max_images": 2, "check_data": False, "progress": False}.items()}
FINETUNE_TINY = {"finetune_schedule#min_iterations": 4, "finetune_schedule#max_iterations": 4, "finetune_schedule#epochs": 2,
                 **{f"finetune_train#{k}": v for k, v in {"batch_size": 2, "lr": 1e-3, "warmup_iterations": 0, "check_data": False,
                                                          "progress": False}.items()}}


def configs(*names: str) -> list[str]:
    return [str(CONFIGS / f"{n}.yaml") for n in ("common", *names)]


def _files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(autouse=True)
def _bundle_folder_untouched():
    """Tests write under tmp_path only: nothing in the bundle folder is created or changed. (Also puts back the root
    logger, which a bundle run configures from configs/logging.conf.)"""
    before = _files(BUNDLE)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    assert _files(BUNDLE) == before


@pytest.fixture
def parse(data):
    """``parse(*workflows, **overrides)``: the bundle's merged config, as ``monai.bundle run`` builds it."""

    def make(*names: str, **overrides) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(configs(*names))
        parser.read_meta(str(META))
        parser.update(overrides)
        return parser

    return make


# --------------------------------------------------------------------------------------------- layout and configs
def test_layout_and_configs():
    for rel in ("configs/metadata.json", "configs/logging.conf", "docs/README.md", "LICENSE", "configs/schema/meta_schema.json",
                *(f"configs/{n}.yaml" for n in ("common", *WORKFLOWS, "multi_gpu", "mlflow"))):
        assert (BUNDLE / rel).is_file(), rel
    for name in WORKFLOWS:
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert "run" in cfg, name
        targets = [v["_target_"] for v in cfg.values() if isinstance(v, dict) and "_target_" in v]
        assert targets and all(t.startswith("medhybrid.") for t in targets), (name, targets)  # wired, not copied
    readme = (BUNDLE / "docs" / "README.md").read_text()
    for name in WORKFLOWS:
        assert f"'configs/common.yaml','configs/{name}.yaml'" in readme, name


def test_verify_metadata_passes_offline_and_catches_errors(tmp_path):
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))  # the schema file exists: nothing is downloaded
    meta = json.loads(META.read_text())
    assert meta["schema"] == "configs/schema/meta_schema.json"
    assert "2408.03433" in " ".join(meta["references"])
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 3 and fmt["inputs"]["image"]["value_range"] == [-1, 1]
    for broken in ({"network_data_format": {"inputs": fmt["inputs"]}},                      # no outputs
                   {"network_data_format": {**fmt, "inputs": {"image": {**fmt["inputs"]["image"], "num_channels": "3"}}}},
                   {"version": None}):
        bad = tmp_path / "metadata.json"
        bad.write_text(json.dumps({k: v for k, v in {**meta, **broken}.items() if v is not None}))
        with pytest.raises(ValueError, match="Failed validating"):
            verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


def test_verify_net_in_out():
    # `device` here is verify_net_in_out's own argument (where to run the check), not the bundle's `device` id
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=configs(), device="cpu", **TINY_NET)
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=configs(), device="cpu",
                          **{**TINY_NET, "_meta_#network_data_format#outputs#pred#num_channels": 2})


def test_multi_gpu_override(parse, monkeypatch):
    """multi_gpu.yaml: one pretraining process per GPU, NCCL (resolved here with 2 GPUs pretended, not run)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = parse("pretrain", "multi_gpu").get_parsed_content("pretrain_config")
    assert (cfg.train.nproc, cfg.train.backend, cfg.train.device) == (2, "nccl", "auto")
    single = parse("pretrain").get_parsed_content("pretrain_config")
    assert (single.train.nproc, single.train.backend) == (1, None)


def test_mlflow_override(parse, tmp_path):
    off = parse("finetune", bundle_root=str(tmp_path)).get_parsed_content("mlflow")
    assert off["enabled"] is False
    p = parse("pretrain", "mlflow", bundle_root=str(tmp_path))
    cfg = p.get_parsed_content("pretrain_config")
    assert cfg.mlflow.enabled and cfg.mlflow.tracking_uri == f"sqlite:///{os.path.abspath(tmp_path / 'mlflow.db')}"
    assert cfg.mode == "hybrid" and cfg.dataset.name == "isic2018" and cfg.folder == tmp_path / "runs" / "pretrain-hybrid"
    cfg = parse("pretrain", "mlflow", bundle_root=str(tmp_path), mlflow_tracking_uri="http://127.0.0.1:5000").get_parsed_content("pretrain_config")
    assert cfg.mlflow.tracking_uri == "http://127.0.0.1:5000"


# --------------------------------------------------------------------------------------------- the workflows
def test_workflows_end_to_end(workdir, mlflow_uri, write_dicom):
    """pretrain (hybrid) -> finetune (budget 2, from that checkpoint) -> evaluate -> inference -> TorchScript export, each
    through monai.bundle with the bundle's configs on real ISIC / PH2 images, tracked in MLflow by the override."""
    root = workdir / "bundle"
    source = isic_yaml(workdir / "datasets", n_train=8, n_val=2)
    target = ph2_yaml(workdir / "datasets", n_pool=4, n_test=3)
    base = {"bundle_root": str(root), "source_dataset": str(source), "target_dataset": str(target), "mlflow_tracking_uri": mlflow_uri,
            **TINY}
    files = {"meta_file": str(META), "logging_file": str(LOGGING)}

    run(config_file=configs("pretrain", "mlflow"), **files, **base, **PRETRAIN_TINY)
    pretrained = root / "runs" / "pretrain-hybrid" / "model.pt"
    assert load_model(pretrained)[1]["mode"] == "hybrid"

    run(config_file=configs("finetune", "mlflow"), **files, **base, **FINETUNE_TINY, budget=2)
    model_pt = root / "models" / "model.pt"
    net, meta = load_model(model_pt)
    assert (meta["mode"], meta["method"], meta["budget"], meta["dataset"]) == ("finetune", "hybrid", 2, "ph2_tiny")
    assert meta["preprocess"]["resolution"] == 32 and net.image_channels == 3 and net.mask_channels == 1
    ids = json.loads((root / "runs" / "finetune-hybrid-b2-s0" / "subset.json").read_text())["ids"]
    assert len(ids) == 2 and set(ids) <= set(real_split(PH2)["pool"][:4])  # the label budget, from the target's pool

    run(config_file=configs("evaluate"), **files, **base)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["test_images"] == 3 and metrics["dataset"] == "ph2_tiny" and metrics["split"] == "test"
    assert 0 <= metrics["test_dice"] <= 1 and 0 <= metrics["test_iou"] <= metrics["test_dice"]
    with open(root / "eval" / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == real_split(PH2)["test"][:3]
    assert all(0 <= float(r["dice"]) <= 1 for r in rows)

    # MLflow: one run per training stage, finished, in the tracking store the override pointed at
    client = mlflow_client(mlflow_uri)
    exp = client.get_experiment_by_name("medhybrid-bundle")
    runs = {r.data.tags["medhybrid.stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"pretrain", "finetune"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["pretrain"].data.tags["medhybrid.mode"] == "hybrid" and runs["finetune"].data.tags["budget"] == "2"
    assert runs["finetune"].data.params["init"] == str(pretrained)

    # inference, as a user runs it: python -m monai.bundle run ... in a subprocess, on a PH2 PNG and a DICOM of real pixels
    inputs = workdir / "input"
    inputs.mkdir()
    png = inputs / "IMD006.png"
    png.write_bytes((PH2 / "images" / "IMD006.png").read_bytes())
    grey = np.asarray(Image.open(PH2 / "images" / "IMD009.png").convert("L"))
    dcm = write_dicom(inputs / "IMD009_grey.dcm", grey)
    out = workdir / "masks"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs("inference")), "--meta_file", str(META),
           "--logging_file", str(LOGGING), "--bundle_root", str(root), "--input_dir", str(inputs), "--output_dir", str(out),
           "--nifti", "True", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "masks written: 2" in proc.stdout
    for src in (png, dcm):
        stem = src.name.rsplit(".", 1)[0]
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == read_image(src)[0].shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert (out / f"{stem}_mask.nii.gz").is_file()

    # TorchScript export of the bundle's network with the fine-tuned weights; same output as the eager network
    ts_path = workdir / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(model_pt), meta_file=str(META), config_file=configs("inference"),
                key_in_ckpt="state_dict", use_trace=True, **TINY_NET)
    from monai.data import load_net_with_metadata

    ts, ts_meta, extra = load_net_with_metadata(str(ts_path), more_extra_files=["common.json", "inference.json"])
    assert ts_meta["version"] == json.loads(META.read_text())["version"] and set(extra) == {"common.json", "inference.json"}
    eager, _ = load_segmenter(model_pt, "cpu")
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 3, 64, 64), (2, 3, 32, 32)):
        x = torch.rand(shape, generator=g) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(ts(x), eager(x), atol=1e-5, rtol=1e-4)
