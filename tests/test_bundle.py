"""The MONAI bundles in ``bundles/`` (dermoscopy RGB, chest X-ray grey/DICOM) and :mod:`medhybrid.workflows.bundle`: every
workflow run through ``monai.bundle``'s command-line entry on real images, from a copy of the bundle folder (in this
process, :func:`conftest.run_bundle`; under ``torchrun``, in its own processes). A bundle folder installed into a
fresh environment and run with ``python -m monai.bundle run`` is tests/test_bundle_install.py's."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import DICOM, OPENIST, PH2, REPO_ROOT, BundleRun, bundle_command, isic_yaml, real_split, run_bundle
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from PIL import Image

from medhybrid.data.io import DataError, read_image
from medhybrid.networks.checkpoints import save_model
from medhybrid.networks.nets import ModelConfig, build_network
from medhybrid.workflows.bundle import image_datalist, labelled_datalist, publish_weights, save_weights, sha256, unlabelled_datalist
from medhybrid.workflows.inference import Segmenter

pytestmark = [
    pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning"),  # MONAI's notice that configs run code
    pytest.mark.filterwarnings("ignore:No hash value provided:UserWarning"),
]

BUNDLES = REPO_ROOT / "bundles"
DERM = BUNDLES / "dermoscopy_lesion_segmentation"
CHEST = BUNDLES / "chest_xray_lung_segmentation"
WORKFLOWS = ("inference", "train", "evaluate", "multi_gpu_train", "pretrain")
DOMAIN_IDS = {"image_channels", "labels", "dataset_dir", "label_values", "label_threshold", "source_dataset", "semi_algorithm",
              "wise"}
"""The only top-level ids in which the two bundles' configs may differ (``semi_algorithm``, ``wise``: what won on each
target)."""


def _files(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(autouse=True)
def _bundle_folders_untouched():
    """Tests write under tmp_path only: nothing in a shipped bundle is created or changed. (The loggers a bundle run
    configures are put back by :func:`conftest.run_bundle`.)"""
    before = {b: _files(b) for b in (DERM, CHEST)}
    yield
    assert {b: _files(b) for b in (DERM, CHEST)} == before


def copy_bundle(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval", "runs"))
    return dst


def torchrun_bundle(bundle: Path, configs: list[str], *args: str, processes: int = 2) -> BundleRun:
    """``python -m torch.distributed.run --standalone --nproc_per_node=<processes> -m monai.bundle run ...`` in the
    bundle folder, as a user launches it: the bundle folder is the working directory and nothing of the repository is
    on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m",
           "monai.bundle", *bundle_command(configs, *args)]
    res = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return BundleRun(res.returncode, res.stdout + res.stderr)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def decathlon(tmp_path: Path, ids: list[str]) -> Path:
    """A MONAI (decathlon-style) datalist of PH2 pairs, ``training`` (medhybrid's split ``train``) = the given ids."""
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": str(PH2 / "images" / f"{i}.png"),
                                              "label": str(PH2 / "masks" / f"{i}_lesion.png")} for i in ids]}))
    return path


# --------------------------------------------------------------------------------------------- layout and configs
@pytest.mark.parametrize("bundle", [DERM, CHEST], ids=lambda b: b.name)
def test_model_zoo_layout_and_weights_match_their_checksums(bundle):
    for f in [*(f"configs/{w}.json" for w in WORKFLOWS), "configs/metadata.json", "configs/logging.conf", "large_files.yml",
              "docs/README.md", "LICENSE", "models/model.pt", "models/pretrained.pt"]:
        assert (bundle / f).is_file(), f
    listed = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert {e["path"] for e in listed} == {"models/model.pt", "models/pretrained.pt"}
    for e in listed:
        assert e["hash_type"] == "sha256" and sha256(bundle / e["path"]) == e["hash_val"], e["path"]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    for e in listed:  # plain state dicts of network_def, loadable without pickled code
        net.load_state_dict(torch.load(bundle / e["path"], map_location="cpu", weights_only=True), strict=True)
    assert isinstance(net, Segmenter) and type(net.backbone).__name__ == "DiffusionModelUNet"  # the preconditioning wrapper


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("bundle", [DERM, CHEST], ids=lambda b: b.name)
def test_verify_net_in_out_and_ckpt_export(bundle, tmp_path):
    """MONAI's own checks: the network maps metadata's input to its output shape, and exports to TorchScript with
    the bundle's weights (the exported model gives the network's logits)."""
    cfg, meta = str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "metadata.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=cfg, device="cpu", n=1, any=1)
    channels = json.loads(Path(meta).read_text())["network_data_format"]["inputs"]["image"]["num_channels"]
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(bundle / "models" / "model.pt"), meta_file=meta,
                config_file=cfg, use_trace=True, input_shape=[1, channels, 64, 64])
    parser = ConfigParser()
    parser.read_config(cfg)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, channels, 64, 64) * 2 - 1
    with torch.no_grad():
        want = net.eval()(x)
        got = torch.jit.load(str(ts))(x)
    assert want.shape == (2, 1, 64, 64) and torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("bundle", [DERM, CHEST], ids=lambda b: b.name)
def test_verify_metadata_offline(bundle):
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(bundle / "configs" / "schema" / "meta_schema.json"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["required_packages_version"]["medhybrid"] and "mean_dice" in meta["eval_metrics"]
    assert len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]) == 2  # MONAI Label reads 2D from it


def test_the_bundles_share_their_configs_but_for_the_domain():
    for w in WORKFLOWS:
        d, c = (json.loads((b / "configs" / f"{w}.json").read_text()) for b in (DERM, CHEST))
        assert set(d) == set(c), w
        differ = {k for k in d if d[k] != c[k]}
        assert differ <= DOMAIN_IDS, (w, differ - DOMAIN_IDS)
    for b in (DERM, CHEST):  # the standalone inference config declares the same network as training
        inf, train = (json.loads((b / "configs" / f"{w}.json").read_text()) for w in ("inference", "train"))
        assert inf["network_def"] == train["network_def"]
        shared = ("image_channels", "resolution", "intensity")
        assert {k: inf[k] for k in shared} == {k: train[k] for k in shared}
    assert json.loads((CHEST / "configs" / "inference.json").read_text())["image_channels"] == 1


# --------------------------------------------------------------------------------------------- inference
def test_dermoscopy_inference_runs_alone_on_png_and_dicom(tmp_path, write_dicom):
    bundle = copy_bundle(DERM, tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    ids = real_split(PH2)["test"][:3]
    shutil.copy(PH2 / "images" / f"{ids[0]}.png", inputs)
    shutil.copy(PH2 / "images" / f"{ids[1]}.png", inputs)
    write_dicom(inputs / f"{ids[2]}.dcm", np.asarray(Image.open(PH2 / "images" / f"{ids[2]}.png")))  # RGB DICOM
    out = tmp_path / "masks"
    run_bundle(bundle, ["inference"], "--input_dir", str(inputs), "--output_dir", str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}_mask.png" for i in ids] + [f"{ids[2]}_seg.dcm", "quality.csv"])
    rows = list(csv.DictReader(open(out / "quality.csv")))
    assert sorted(Path(r["image"]).stem for r in rows) == sorted(ids) and all(r["status"] == "ok" for r in rows)
    for i in ids:
        mask = np.asarray(Image.open(out / f"{i}_mask.png"))
        truth = np.asarray(Image.open(PH2 / "masks" / f"{i}_lesion.png"))
        assert mask.shape == truth.shape and set(np.unique(mask)) <= {0, 255}
        assert dice(mask, truth) > 0.8, i
    seg = pydicom.dcmread(out / f"{ids[2]}_seg.dcm")
    src = pydicom.dcmread(inputs / f"{ids[2]}.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"
    assert np.array_equal(seg.pixel_array > 0, np.asarray(Image.open(out / f"{ids[2]}_mask.png")) > 0)


def test_chest_inference_on_real_pacs_dicom_and_jpeg(tmp_path):
    """CR MONOCHROME1 15-bit (uncompressed and JPEG 2000), DX 8-bit, and an OpenIST JPEG: masks at each input's size,
    a DICOM SEG per DICOM, the same lungs from both encodings of one image."""
    bundle = copy_bundle(CHEST, tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in DICOM.glob("*.dcm"):
        shutil.copy(f, inputs)
    sid = real_split(OPENIST)["test"][0]
    img = next((OPENIST / "images").glob(f"{sid}.*"))
    shutil.copy(img, inputs)
    out = tmp_path / "masks"
    run_bundle(bundle, ["inference"], "--input_dir", str(inputs), "--output_dir", str(out))
    for f in DICOM.glob("*.dcm"):
        mask = np.asarray(Image.open(out / f"{f.stem}_mask.png")) > 0
        assert mask.shape == read_image(f)[0].shape[:2]
        assert 0.1 < mask.mean() < 0.6, (f.name, mask.mean())  # two lungs, not nothing and not everything
        seg = pydicom.dcmread(out / f"{f.stem}_seg.dcm")
        src = pydicom.dcmread(f, stop_before_pixels=True)
        assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lung"
    assert dice(np.asarray(Image.open(out / "RG1_UNCI_mask.png")), np.asarray(Image.open(out / "RG1_J2KI_mask.png"))) > 0.95
    truth = np.asarray(Image.open(OPENIST / "masks" / f"{sid}_mask.png")) >= 128
    assert dice(np.asarray(Image.open(out / f"{sid}_mask.png")), truth) > 0.9


@pytest.mark.parametrize("which", [DERM, CHEST], ids=lambda b: b.name)
def test_bundle_and_medhybrid_infer_write_the_same_masks_and_survive_bad_files(which, tmp_path, data):
    """One pipeline: the bundle run and ``medhybrid infer --model <bundle>`` on the same folder (PH2 PNGs, a
    camera-size JPEG, a DICOM, a truncated JPEG, a text file named .png, a DICOM cut short) write byte-identical masks
    for every good image; the bundle names each bad file in one line, ends with a summary and exit status 1, and
    prints no traceback."""
    from medhybrid.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    ids = real_split(PH2)["test"][:2]
    for i in ids:
        shutil.copy(PH2 / "images" / f"{i}.png", inputs)
    Image.open(PH2 / "images" / f"{ids[0]}.png").convert("RGB").resize((4000, 3000)).save(inputs / "camera.jpg", quality=90)
    shutil.copy(DICOM / "nih_cxr14_dx_1024.dcm", inputs)
    (inputs / "truncated.jpg").write_bytes((inputs / "camera.jpg").read_bytes()[:30000])
    (inputs / "notes.png").write_text("not an image")
    (inputs / "cut.dcm").write_bytes((DICOM / "RG1_UNCI.dcm").read_bytes()[:5000])
    bundle = copy_bundle(which, tmp_path)
    res = run_bundle(bundle, ["inference"], "--input_dir", str(inputs), "--output_dir", str(tmp_path / "b"), check=False)
    log = res.log
    assert res.returncode == 1 and "Traceback" not in log, log[-3000:]
    for bad in ("truncated.jpg", "notes.png", "cut.dcm"):
        assert sum(f"skipped {inputs / bad}:" in line for line in log.splitlines()) == 1, bad
    assert "4 of 7 image(s) segmented, 3 could not be read" in log
    assert main(["infer", "--model", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "c")]) == 1
    good = [f"{i}_mask.png" for i in ids] + ["camera_mask.png", "nih_cxr14_dx_1024_mask.png"]
    for name in good:
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    assert np.asarray(Image.open(tmp_path / "b" / "camera_mask.png")).shape == (3000, 4000)


# --------------------------------------------------------------------------------------------- evaluation
SAVE_MASKS = {"+validate#postprocessing#transforms": [{
    "_target_": "medhybrid.data.transforms.SaveMask2Dd", "keys": "pred", "output_dir": "$@output_dir + '/masks'",
    "postfix": "_mask", "binary_png": True}]}
"""A config layered after evaluate.json (MONAI's ``+`` merges it into the list): the evaluation also writes each mask
it scores, as a PNG at the image's size."""

FLOOR = {DERM: 0.85, CHEST: 0.9}
"""The least mean test Dice the shipped weights must reach (the model cards report about 0.93 and 0.97)."""


@pytest.mark.slow
@pytest.mark.parametrize("bundle", [DERM, CHEST], ids=lambda b: b.name)
def test_evaluate_scores_the_masks_it_writes(bundle, tmp_path):
    """The shipped weights on the target's whole test split at native resolution (evaluate.json, writing the masks it
    scores): Dice recomputed from the mask files and the ground-truth files with MONAI's ``compute_dice`` agrees, to
    1e-6, image by image with the evaluation's per-image CSV and in the mean with its metrics.csv, and the mean clears
    a floor on these real images."""
    from monai.metrics import compute_dice

    work = copy_bundle(bundle, tmp_path)
    (work / "configs" / "save_masks.json").write_text(json.dumps(SAVE_MASKS))
    run_bundle(work, ["train", "evaluate", "save_masks"], "--output_dir", str(tmp_path / "eval"))
    metrics = {r[0]: float(r[1]) for r in csv.reader(open(tmp_path / "eval" / "metrics.csv"))}
    rows = {Path(r["filename"]).stem: float(r["mean"]) for r in csv.DictReader(open(tmp_path / "eval" / "val_mean_dice_raw.csv"))}
    root, suffix = (PH2, "_lesion") if bundle == DERM else (OPENIST, "_mask")
    split = real_split(root)
    assert set(rows) == set(split["test"])
    own = {}
    for sid in split["test"]:
        pred = np.asarray(Image.open(tmp_path / "eval" / "masks" / f"{sid}_mask.png")) > 0
        truth = np.asarray(Image.open(root / "masks" / f"{sid}{suffix}.png")) >= 128  # 0/255 (OpenIST's anti-aliased)
        assert pred.shape == truth.shape, sid
        own[sid] = float(compute_dice(torch.from_numpy(pred)[None, None].double(), torch.from_numpy(truth)[None, None].double(),
                                      include_background=True).item())
    assert rows == pytest.approx(own, abs=1e-6)
    assert metrics["val_mean_dice"] == pytest.approx(np.mean(list(own.values())), abs=1e-6)
    assert np.mean(list(own.values())) > FLOOR[bundle]


def test_evaluate_scores_every_readable_pair_and_names_the_unreadable_one(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    ids = real_split(PH2)["test"][:3]
    for i in ids:
        shutil.copy(PH2 / "images" / f"{i}.png", data / "images" / f"{i}.png")
        shutil.copy(PH2 / "masks" / f"{i}_lesion.png", data / "masks" / f"{i}.png")
    broken = data / "images" / f"{ids[0]}.png"
    broken.write_bytes(broken.read_bytes()[:600])
    work = copy_bundle(DERM, tmp_path)
    res = run_bundle(work, ["train", "evaluate"], "--dataset_dir", str(data), "--output_dir", str(tmp_path / "eval"),
                     check=False)
    log = res.log
    assert res.returncode == 1 and "Traceback" not in log, log[-3000:]
    assert sum(f"skipped {broken}:" in line for line in log.splitlines()) == 1, log[-3000:]
    assert re.search(r"evaluation: 3/3 images, [\d.]+ images/s, \d+:\d\d in all", log), log[-3000:]  # progress, named
    rows = list(csv.DictReader(open(tmp_path / "eval" / "val_mean_dice_raw.csv")))
    assert sorted(Path(r["filename"]).stem for r in rows) == sorted(ids[1:])


# --------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_train_fine_tunes_the_pretraining_and_publishes_the_weights(tmp_path):
    bundle = copy_bundle(DERM, tmp_path)
    pool = real_split(PH2)["pool"][:6]
    before = sha256(bundle / "models" / "model.pt")
    res = run_bundle(bundle, ["train"], "--dataset_dir", str(decathlon(tmp_path, pool)), "--train_split", "train",
                     "--val_fraction", "0.34", "--min_iterations", "6", "--max_iterations", "6", "--adapt", "False")
    assert "val_mean_dice" in res.log
    assert sha256(bundle / "models" / "model.pt") != before
    assert sha256(bundle / "models" / "pretrained.pt") == sha256(DERM / "models" / "pretrained.pt")
    out = tmp_path / "masks"
    inputs = tmp_path / "in"
    inputs.mkdir()
    test_id = real_split(PH2)["test"][0]
    shutil.copy(PH2 / "images" / f"{test_id}.png", inputs)
    run_bundle(bundle, ["inference"], "--input_dir", str(inputs), "--output_dir", str(out))
    assert dice(np.asarray(Image.open(out / f"{test_id}_mask.png")), np.asarray(Image.open(PH2 / "masks" / f"{test_id}_lesion.png"))) > 0.7


@pytest.mark.slow
def test_train_publishes_the_wiseft_interpolation_with_its_start(tmp_path):
    """train.json's ``wise`` reaches the published weights: at 0 they are the weights training started from
    (``pretrained.pt``), tensor for tensor; the shipped value is the ablation's 0.75."""
    bundle = copy_bundle(DERM, tmp_path)
    assert json.loads((bundle / "configs" / "train.json").read_text())["wise"] == 0.75
    folder = decathlon(tmp_path, real_split(PH2)["pool"][:2])
    res = run_bundle(bundle, ["train"], "--dataset_dir", str(folder), "--train_split", "train", "--semi_algorithm", "none",
                     "--min_iterations", "2", "--max_iterations", "2", "--wise", "0", "--adapt", "False")
    assert "WiSE-FT: the trained weights interpolated" in res.log
    start = torch.load(DERM / "models" / "pretrained.pt", weights_only=True)
    published = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert published.keys() == start.keys()
    assert all(torch.equal(published[k], start[k]) for k in start)


@pytest.mark.slow
def test_train_reads_the_unlabelled_images_of_the_dataset_folder(tmp_path):
    """A dataset folder whose images lack some masks, and an extra folder of images: train.json's semi-supervised
    recipe reads both without masks beside the labelled pairs; ``semi_algorithm=none`` trains on the labels alone."""
    bundle = copy_bundle(DERM, tmp_path)
    pool = real_split(PH2)["pool"]
    folder = tmp_path / "site"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in pool[:5]:
        shutil.copy(PH2 / "images" / f"{i}.png", folder / "images")
    for i in pool[:2]:  # two labelled, three not yet
        shutil.copy(PH2 / "masks" / f"{i}_lesion.png", folder / "masks" / f"{i}.png")
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in pool[5:9]:
        shutil.copy(PH2 / "images" / f"{i}.png", archive)
    assert len(labelled_datalist(folder, None, 3, allow_unlabelled=True)) == 2
    assert sorted(Path(d["image"]).stem for d in unlabelled_datalist(folder, None, archive)) == sorted(pool[2:9])
    # adapt's decision is tested in tests/test_adapt.py; here the recipe's data alone, trained directly
    res = run_bundle(bundle, ["train"], "--dataset_dir", str(folder), "--unlabelled_dir", str(archive),
                     "--min_iterations", "4", "--max_iterations", "4", "--adapt", "False")
    semi = json.loads((bundle / "configs" / "train.json").read_text())["semi_algorithm"]
    assert f"semi-supervised fine-tuning ({semi}): 2 labelled, 7 unlabelled images" in res.log
    assert sha256(bundle / "models" / "model.pt") != sha256(DERM / "models" / "model.pt")
    plain = run_bundle(bundle, ["train"], "--dataset_dir", str(folder), "--semi_algorithm", "none",
                       "--min_iterations", "4", "--max_iterations", "4", "--adapt", "False")
    assert "semi-supervised fine-tuning" not in plain.log


@pytest.mark.slow
def test_multi_gpu_train_under_torchrun_with_gloo(tmp_path):
    """configs/multi_gpu_train.json layered over train.json, 2 processes on the CPU: one weights file, from rank 0."""
    bundle = copy_bundle(DERM, tmp_path)
    res = torchrun_bundle(bundle, ["train", "multi_gpu_train"], "--dataset_dir",
                          str(decathlon(tmp_path, real_split(PH2)["pool"][:4])), "--train_split", "train",
                          "--min_iterations", "4", "--max_iterations", "4")
    assert "bundle weights written" in res.log
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # unwrapped from DistributedDataParallel
    assert sha256(bundle / "models" / "model.pt") != sha256(DERM / "models" / "model.pt")
    assert not list(bundle.glob("models/.*.tmp"))


def test_pretrain_workflow_publishes_pretrained_weights(tmp_path):
    bundle = copy_bundle(DERM, tmp_path)
    source = isic_yaml(tmp_path / "data", n_train=8, n_val=2)
    run_bundle(bundle, ["train", "pretrain"], "--source_dataset", str(source), "--pretrain_config#train#epochs", "1",
               "--pretrain_config#train#epoch_length", "2", "--pretrain_config#train#batch_size", "4",
               "--pretrain_config#train#val_max_images", "2", "--pretrain_config#train#check_data", "false")
    assert (bundle / "runs" / "pretrain-hybrid" / "model.pt").is_file()
    assert sha256(bundle / "models" / "pretrained.pt") != sha256(DERM / "models" / "pretrained.pt")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.get_parsed_content("network_def").load_state_dict(
        torch.load(bundle / "models" / "pretrained.pt", map_location="cpu", weights_only=True), strict=True)


# --------------------------------------------------------------------------------------------- medhybrid.workflows.bundle
def test_datalists_name_the_problem(tmp_path):
    pool = real_split(PH2)["pool"][:3]
    got = labelled_datalist(decathlon(tmp_path, pool), "train")
    assert [Path(d["image"]).stem for d in got] == pool and all(Path(d["label"]).is_file() for d in got)
    assert len(labelled_datalist("ph2", "test")) == len(real_split(PH2)["test"])
    with pytest.raises(DataError, match="no labelled images in split 'test'"):
        labelled_datalist(decathlon(tmp_path, pool), "test")
    folder = tmp_path / "labelled"  # images/ + masks/ without split.json: every pair, whatever split is asked
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in pool[:2]:
        shutil.copy(PH2 / "images" / f"{i}.png", folder / "images")
        shutil.copy(PH2 / "masks" / f"{i}_lesion.png", folder / "masks" / f"{i}.png")
    assert [Path(d["label"]).name for d in labelled_datalist(folder, "pool", 3)] == [f"{i}.png" for i in pool[:2]]
    (folder / "masks" / f"{pool[1]}.png").unlink()
    with pytest.raises(DataError, match=rf"1 mask\(s\) not found: .*{pool[1]}\.png"):
        labelled_datalist(folder, None, 3)
    (tmp_path / "imgs").mkdir()
    shutil.copy(PH2 / "images" / f"{pool[0]}.png", tmp_path / "imgs")
    assert image_datalist(tmp_path / "imgs") == [{"image": str(tmp_path / "imgs" / f"{pool[0]}.png")}]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        image_datalist(tmp_path / "empty")


def test_save_and_publish_weights_are_atomic_and_checked(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(DERM / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    out = save_weights(net, tmp_path / "w" / "model.pt")
    assert out.is_file() and not list(out.parent.glob(".*.tmp"))
    assert set(torch.load(out, weights_only=True)) == set(net.state_dict())
    cfg = ModelConfig(channels=(16, 32, 32), attention_levels=(False, False, False))
    small = build_network(cfg, 3)
    save_model(small, {"model": cfg.model_dump(), "image_channels": 3, "num_classes": 2}, tmp_path / "run.pt")
    with pytest.raises(DataError, match="does not fit the bundle's network_def"):
        publish_weights(tmp_path / "run.pt", tmp_path / "w" / "pretrained.pt", net)
    assert not (tmp_path / "w" / "pretrained.pt").exists()
