"""medhybrid.label: the MONAI Label app.

The workspace (serving, segmenting a study into a mask file, training from saved labels) is tested here in the main
environment. The ``label``-marked test starts the real MONAI Label server (``.venv-label``, scripts/setup_label.sh)
on 127.0.0.1 with PNG and DICOM studies made from PH2 images, and goes through what a clinician's viewer does:
``/infer``, ``/activelearning``, saving labels, ``/train`` with the UI's default settings, ``/infer`` again.
Select it with ``pytest -m label``; it fails (not skips) when the label environment is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PH2, REPO_ROOT, TINY_NET, isic_yaml, mlflow_client, real_split
from PIL import Image

from medhybrid.config import ConfigError, load_config
from medhybrid.evaluate import binary_metrics
from medhybrid.inference import publish_model
from medhybrid.io import DataError, read_image
from medhybrid.label.workspace import LabelWorkspace, TrainParams, pick_device, write_label
from medhybrid.pretrain import PretrainConfig, free_port, load_model, run_pretraining

LABEL_PYTHON = Path(os.environ.get("MEDHYBRID_LABEL_PYTHON", REPO_ROOT / ".venv-label" / "bin" / "python"))
BUNDLE = REPO_ROOT / "bundles" / "medhybrid_2d_segmentation"


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, data) -> Path:
    """A bundle folder as the app reads it: the repository bundle's metadata, a tiny hybrid network pretrained on 32 real
    ISIC images (runs/pretrain-hybrid/model.pt) and, as its served weights, that same network (models/model.pt)."""
    root = tmp_path_factory.mktemp("label_bundle")
    bundle = root / "bundle"
    (bundle / "configs").mkdir(parents=True)
    shutil.copy(BUNDLE / "configs" / "metadata.json", bundle / "configs" / "metadata.json")
    cfg = load_config(PretrainConfig, None, [
        f"dataset={isic_yaml(root / 'datasets', n_train=32, n_val=4)}", "mode=hybrid", f"output_dir={bundle / 'runs' / 'pretrain-hybrid'}",
        "mlflow.enabled=false", *TINY_NET, "preprocess.aspect=pad", "train.batch_size=8", "train.epochs=1", "train.epoch_length=40",
        "train.lr=1e-3", "train.warmup_iterations=5", "train.val_max_images=4", "train.check_data=false", "train.device=cpu",
        "train.progress=false"])
    pre = run_pretraining(cfg)
    publish_model(pre.checkpoint, bundle / "models" / "model.pt")
    return bundle


def _pool(n: int, start: int = 0) -> list[str]:
    return real_split(PH2)["pool"][start : start + n]


def _truth(sid: str) -> np.ndarray:
    return (np.asarray(Image.open(PH2 / "masks" / f"{sid}_lesion.png")) > 127).astype(np.uint8)


# --------------------------------------------------------------------------------------------- the workspace
def test_write_label_png_and_nifti_with_the_dicom_geometry(tmp_path, write_dicom):
    import SimpleITK as sitk

    mask = np.zeros((30, 50), np.uint8)
    mask[5:20, 10:40] = 1
    png = write_label(mask, tmp_path / "any.png", tmp_path / "m.png")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), mask)  # class indices, 8-bit grey
    dcm = write_dicom(tmp_path / "s.dcm", (np.arange(1500, dtype=np.uint16).reshape(30, 50)))
    nii = write_label(mask, dcm, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(read_image(nii)[0], mask)  # the study's rows and columns, not transposed
    ref, lab = sitk.ReadImage(str(dcm)), sitk.ReadImage(str(nii))
    assert lab.GetSize() == ref.GetSize() and np.allclose(lab.GetSpacing(), ref.GetSpacing())
    np.testing.assert_allclose(lab.GetDirection(), ref.GetDirection(), atol=1e-6)


def test_workspace_refuses_a_bundle_without_metadata_or_weights(tmp_path, tiny_bundle):
    with pytest.raises(ConfigError, match="no configs/metadata.json"):
        LabelWorkspace(tmp_path, tmp_path / "w")
    (tmp_path / "b" / "configs").mkdir(parents=True)
    shutil.copy(tiny_bundle / "configs" / "metadata.json", tmp_path / "b" / "configs")
    with pytest.raises(ConfigError, match=r"models/model.pt not found"):
        LabelWorkspace(tmp_path / "b", tmp_path / "w")
    ws = LabelWorkspace(tiny_bundle, tmp_path / "w", pretrained=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="missing.pt not found"):
        ws.train([{"id": "a", "image": "a.png", "label": "a_label.png"}])
    with pytest.raises(ValueError, match="no saved labels"):
        ws.train([])


def test_train_params_take_the_ui_settings_and_ignore_the_rest():
    p = TrainParams(**{"model": "medhybrid", "gpus": "all", "name": "train_01", "max_iterations": 7, "val_split": 0.5})
    assert (p.max_iterations, p.val_split, p.seed) == (7, 0.5, 0)
    with pytest.raises(ValueError):
        TrainParams(val_split=1.0)
    assert pick_device("auto") == "auto" and pick_device(None) == "auto"
    if not torch.cuda.is_available():
        assert pick_device("cuda") == "cpu"  # MONAI Label's UIs ask for cuda by default


def test_segment_png_and_dicom_studies_at_their_own_size(tmp_path, tiny_bundle, write_dicom):
    ws = LabelWorkspace(tiny_bundle, tmp_path / "w", device="cpu")
    assert ws.labels() == {"lesion": 1} and ws.model_path == tiny_bundle / "models" / "model.pt"
    sid = _pool(1)[0]
    rgb = np.asarray(Image.open(PH2 / "images" / f"{sid}.png"))
    dcm = write_dicom(tmp_path / f"{sid}.dcm", rgb, spacing=0.05)  # RGB DICOM, as a dermoscopy camera stores it
    out_png, info = ws.segment(PH2 / "images" / f"{sid}.png", tmp_path / "a.png")
    out_nii, _ = ws.segment(dcm, tmp_path / "b.nii.gz")
    a, b = np.asarray(Image.open(out_png)), read_image(out_nii)[0]
    assert a.shape == b.shape == rgb.shape[:2] and rgb.shape[0] != rgb.shape[1]
    assert set(np.unique(a)) <= {0, 1} and 0 < a.sum() < a.size  # a lesion, not an empty or full mask
    np.testing.assert_array_equal(a, b)  # the same pixels as PNG or as RGB DICOM: same mask
    assert info["shape"] == list(rgb.shape[:2]) and info["pixels"]["lesion"] == int(a.sum())
    with pytest.raises(DataError, match="broken.png"):
        (tmp_path / "broken.png").write_bytes(b"not a png")
        ws.segment(tmp_path / "broken.png", tmp_path / "c.png")


def test_train_from_saved_labels_publishes_weights_that_the_next_inference_uses(tmp_path, tiny_bundle, mlflow_template):
    ws = LabelWorkspace(tiny_bundle, tmp_path / "w", device="cpu")
    ids = _pool(5)
    labels = tmp_path / "labels"
    labels.mkdir()
    pairs = []
    for sid in ids:
        Image.fromarray(_truth(sid)).save(labels / f"{sid}.png")  # class indices, as a viewer saves them
        pairs.append({"id": sid, "image": str(PH2 / "images" / f"{sid}.png"), "label": str(labels / f"{sid}.png")})
    before, _ = ws.load()
    stats = ws.train(pairs, {"max_iterations": 20, "lr": 1e-3, "val_split": 0.2, "gpus": "all"})
    assert (stats["labelled"], stats["train_images"], stats["val_images"], stats["iterations"]) == (5, 4, 1, 20)
    assert 0 <= stats["val_dice"] <= 1 and 0 <= stats["val_dice_before"] <= 1
    assert ws.model_path == tmp_path / "w" / "model.pt" and Path(stats["model"]) == ws.model_path
    after, meta = ws.load()
    assert after is not before and meta["mode"] == "finetune" and meta["method"] == "monailabel"
    assert not all(torch.equal(p, q) for p, q in zip(before.state_dict().values(), after.state_dict().values(), strict=True))
    run_dir = Path(stats["run"])
    rows = (run_dir / "datalist.csv").read_text().splitlines()
    assert rows[0] == "id,image,mask,split" and sum(r.endswith(",test") for r in rows) == 1
    assert json.loads((run_dir / "stats.json").read_text()) == stats and ws.history()[-1]["run"] == stats["run"]
    client = mlflow_client(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    run = client.get_run(stats["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["val_dice"] == pytest.approx(stats["val_dice"])
    assert run.data.tags["labelled"] == "5"
    # a label of the wrong size is refused before any training, naming the file
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(labels / "bad.png")
    with pytest.raises(DataError, match="bad.png"):
        ws.train([*pairs[:2], {"id": "bad", "image": str(PH2 / "images" / f"{_pool(1, 6)[0]}.png"), "label": str(labels / "bad.png")}])


def test_uncertainty_ranks_studies_under_the_served_model(tmp_path, tiny_bundle):
    ws = LabelWorkspace(tiny_bundle, tmp_path / "w", device="cpu")
    files = [PH2 / "images" / f"{sid}.png" for sid in _pool(4)]
    scores = ws.uncertainty(files)
    assert len(scores) == 4 and all(0 <= s <= 1 for s in scores)
    assert ws.uncertainty(files) == scores  # seeded noise: the same ranking every call


# --------------------------------------------------------------------------------------------- the real server
class _Server:
    def __init__(self, url: str):
        self.url = url

    def request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 300):
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read(), r.headers.get("Content-Type", "")

    def json(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        raw, _ = self.request(method, path, data, {"Content-Type": "application/json"} if data is not None else None)
        return json.loads(raw) if raw else None

    def upload(self, path: str, field: str, file: Path):
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{file.name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + file.read_bytes() + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{{}}\r\n--{boundary}--\r\n").encode()
        raw, _ = self.request("PUT", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return json.loads(raw)


@pytest.fixture
def label_server(tmp_path, tiny_bundle, write_dicom):
    """The real MONAI Label server with the medhybrid app on 127.0.0.1, over a studies folder of 3 PH2 PNGs and the
    RGB DICOMs of 3 other PH2 images; stopped (its process group) after the test."""
    if not LABEL_PYTHON.is_file():
        pytest.fail(f"{LABEL_PYTHON} not found: the MONAI Label environment is made by scripts/setup_label.sh", pytrace=False)
    studies = tmp_path / "studies"
    studies.mkdir()
    ids = _pool(6, start=10)
    for sid in ids[:3]:
        shutil.copy(PH2 / "images" / f"{sid}.png", studies / f"{sid}.png")
    for sid in ids[3:]:
        write_dicom(studies / f"{sid}.dcm", np.asarray(Image.open(PH2 / "images" / f"{sid}.png")), spacing=0.05)
    port = free_port()
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"), "PYTHONUNBUFFERED": "1",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(LABEL_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(REPO_ROOT / "medhybrid" / "label"),
                             "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
                             "--conf", "bundle", str(tiny_bundle), "--conf", "device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    server = _Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 180
        while True:
            try:
                server.json("GET", "/info/")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"MONAI Label server did not start:\n{(tmp_path / 'server.log').read_text()[-4000:]}", pytrace=False)
                time.sleep(1)
        yield server, studies, ids, tmp_path / "server.log"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _infer(server: _Server, sid: str, out: Path) -> np.ndarray:
    raw, ctype = server.request("POST", f"/infer/medhybrid?image={sid}&output=image")
    suffix = ".png" if "png" in ctype else ".nii.gz"
    out.write_bytes(raw)
    path = out.with_name(out.name + suffix)
    out.rename(path)
    return read_image(path)[0]


@pytest.mark.label
@pytest.mark.slow
def test_label_server_infer_save_train_infer(label_server, tmp_path):
    server, studies, ids, log = label_server
    info = server.json("GET", "/info/")
    assert set(info["models"]) == {"medhybrid"} and set(info["trainers"]) == {"medhybrid"}
    assert info["labels"] == {"lesion": 1} and list(info["strategies"]) == ["random", "uncertainty", "first"]
    assert info["datastore"]["total"] == 6  # the DICOM files are studies too

    # /infer: a mask of each study's size and orientation, PNG for PNG studies and NIfTI for DICOM studies
    truth = {sid: _truth(sid) for sid in ids}
    before = {}
    for sid in ids:
        mask = _infer(server, sid, tmp_path / f"before_{sid}")
        assert mask.shape == truth[sid].shape, (sid, mask.shape, truth[sid].shape)
        assert set(np.unique(mask)) <= {0, 1}
        before[sid] = binary_metrics(torch.as_tensor(mask.astype(np.int64)), torch.as_tensor(truth[sid].astype(np.int64)))["dice"]

    # next sample: the most uncertain unlabelled study
    nxt = server.json("POST", "/activelearning/uncertainty", {})
    assert nxt["id"] in ids and 0 <= nxt["score"] <= 1 and nxt["unlabeled"] == 6
    assert server.json("POST", "/activelearning/random", {})["id"] in ids

    # the clinician saves labels for 5 studies: PNG masks for the PNG studies, NIfTI for the DICOM ones (as a viewer does)
    labelled = ids[:5]
    for sid in labelled:
        f = tmp_path / "upload" / (f"{sid}.png" if (studies / f"{sid}.png").exists() else f"{sid}.nii.gz")
        f.parent.mkdir(exist_ok=True)
        ref = studies / f"{sid}.png" if f.suffix == ".png" else studies / f"{sid}.dcm"
        write_label(truth[sid], ref, f)
        assert server.upload(f"/datastore/label?image={sid}&tag=final", "label", f) == {"image": sid, "label": sid}
    assert server.json("POST", "/activelearning/uncertainty", {})["id"] == ids[5]  # the only unlabelled study left

    # /train with the settings MONAI Label's UI shows (the train task's config, sent back as is)
    params = info["trainers"]["medhybrid"]["config"]
    server.json("POST", "/train/medhybrid", params)
    deadline = time.time() + 600
    while True:
        status = server.json("GET", "/train/")
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.time() < deadline, "training did not finish in 10 minutes"
        time.sleep(2)
    assert status["status"] == "DONE", "\n".join(status.get("details", [])) + log.read_text()[-3000:]
    stats = server.json("GET", "/info/")["train_stats"]["medhybrid"]
    assert (stats["trainings"], stats["labelled"], stats["train_images"], stats["val_images"]) == (1, 5, 4, 1)
    assert Path(stats["model"]) == studies / ".medhybrid" / "model.pt"

    # the next /infer serves the new weights: Dice against the saved labels goes up
    after = {}
    for sid in labelled:
        mask = _infer(server, sid, tmp_path / f"after_{sid}")
        assert mask.shape == truth[sid].shape
        after[sid] = binary_metrics(torch.as_tensor(mask.astype(np.int64)), torch.as_tensor(truth[sid].astype(np.int64)))["dice"]
    mean_before = float(np.mean([before[s] for s in labelled]))
    mean_after = float(np.mean([after[s] for s in labelled]))
    print(f"Dice against the saved labels: before training {mean_before:.3f}, after {mean_after:.3f}")
    assert mean_after > mean_before + 0.02, (before, after)

    # one MLflow run for the training, in the studies' workspace
    client = mlflow_client(f"sqlite:///{studies / '.medhybrid' / 'mlflow.db'}")
    run = client.get_run(stats["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "val_dice" in run.data.metrics
    assert load_model(studies / ".medhybrid" / "model.pt")[1]["method"] == "monailabel"
