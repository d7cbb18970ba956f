"""medhybrid.label: the MONAI Label app.

The app's own parts (served bundle copies, the bundle network for the uncertainty strategy, study leases) are tested
here in the main environment. The ``label``-marked test starts the real MONAI Label server (``.venv-label``,
scripts/setup_label.sh) on 127.0.0.1 with both shipped bundles and PNG and DICOM studies (PH2 images, a real chest
X-ray DICOM), and goes through what annotators' viewers do: ``/info``, ``/infer`` (PNG and DICOM SEG results),
``/activelearning`` from two annotators, saving labels, ``/train`` with the UI's settings, ``/infer`` again.
Select it with ``pytest -m label``; it fails (not skips) when the label environment is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import DICOM, PH2, REPO_ROOT, real_split, running_server
from PIL import Image

from medhybrid.core.config import ConfigError
from medhybrid.label.workspace import BundleNetwork, StudyLeases, check_bundle, pick_device, served_bundle, train_request
from medhybrid.workflows.bundle import sha256
from medhybrid.workflows.pretrain import free_port

LABEL_PYTHON = Path(os.environ.get("MEDHYBRID_LABEL_PYTHON", REPO_ROOT / ".venv-label" / "bin" / "python"))
DERM = REPO_ROOT / "bundles" / "dermoscopy_lesion_segmentation"
CHEST = REPO_ROOT / "bundles" / "chest_xray_lung_segmentation"


def _pool(n: int, start: int = 0) -> list[str]:
    return real_split(PH2)["pool"][start : start + n]


def _truth(sid: str) -> np.ndarray:
    return (np.asarray(Image.open(PH2 / "masks" / f"{sid}_lesion.png")) > 127).astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


# --------------------------------------------------------------------------------------------- the app's own parts
def test_pick_device_falls_back_to_the_cpu():
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("cuda") == "cpu" and pick_device("auto") == "cpu" and pick_device("") == "cpu"


def test_served_bundle_is_a_copy_that_keeps_what_it_learnt(tmp_path):
    src = tmp_path / "src" / DERM.name
    shutil.copytree(DERM, src, ignore=shutil.ignore_patterns("eval", "runs"))
    served = served_bundle(src, tmp_path / "work")
    assert served == (tmp_path / "work" / "bundles" / DERM.name).resolve()
    assert sha256(served / "models" / "model.pt") == sha256(src / "models" / "model.pt")
    learnt = {"model.pt": b"trained", "model.pt.json": b'{"base": "model.base.pt"}', "model.base.pt": b"served before"}
    for name, content in learnt.items():  # what an adapting training on the server leaves
        (served / "models" / name).write_bytes(content)
    cfg = json.loads((src / "configs" / "train.json").read_text())
    cfg["learning_rate"] = 1e-4
    (src / "configs" / "train.json").write_text(json.dumps(cfg))  # the bundle is updated
    (src / "models" / "model.base.pt").write_bytes(b"the source's own")
    again = served_bundle(src, tmp_path / "work")
    assert {name: (again / "models" / name).read_bytes() for name in learnt} == learnt
    assert json.loads((again / "configs" / "train.json").read_text())["learning_rate"] == 1e-4
    (src / "models" / "model.pt").unlink()
    with pytest.raises(ConfigError, match="missing models/model.pt"):
        check_bundle(src)


def test_bundle_network_reloads_when_the_weights_change(tmp_path):
    served = served_bundle(CHEST, tmp_path / "work")
    bn = BundleNetwork(served, "cpu")
    assert bn.meta == {"image_channels": 1, "mask_channels": 1,
                       "preprocess": {"resolution": 64, "aspect": "pad", "intensity": "fixed"}}
    net = bn.get()
    assert bn.get() is net
    state = {k: v * 0 for k, v in net.state_dict().items()}
    time.sleep(0.01)
    torch.save(state, served / "models" / "model.pt")
    fresh = bn.get()
    assert fresh is not net and all(float(v.abs().sum()) == 0 for v in fresh.state_dict().values())


def test_leases_never_give_one_study_to_two_annotators(tmp_path):
    leases = StudyLeases(tmp_path / "leases.json", ttl=60)
    ids = ["a", "b", "c"]
    assert leases.assign(ids, "ann1", ids, now=0) == "a"
    assert leases.assign(ids, "ann2", ids, now=1) == "b"
    assert leases.assign(ids, "ann1", ids, now=2) == "a"  # the same annotator keeps (or moves) their own lease
    assert leases.assign(["c", "b"], "ann1", ids, now=3) == "c"  # moving on releases "a"
    assert leases.assign(ids, "ann3", ids, now=4) == "a"
    assert leases.assign(ids, "ann4", ids, now=5) is None  # all three held
    assert leases.assign(ids, "ann4", ["a", "b"], now=6) is None  # "c" got a label: its lease is gone, nothing left
    assert leases.assign(ids, "ann4", ids, now=200) == "a"  # leases expire
    # persisted: a restarted server still withholds the running leases
    assert StudyLeases(tmp_path / "leases.json", ttl=60).held(now=200) == {"a": "ann4"}


def test_leases_under_concurrent_requests(tmp_path):
    leases = StudyLeases(tmp_path / "leases.json")
    ids = [f"s{i}" for i in range(20)]
    got: dict[str, str | None] = {}

    def ask(client):
        got[client] = leases.assign(ids, client, ids)

    threads = [threading.Thread(target=ask, args=(f"ann{i}",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got.values()) == sorted(ids)  # 20 annotators, 20 different studies


def test_train_requests_are_typed_and_code_is_refused():
    defaults = {"device": ["cpu"], "pretrained": True, "max_epochs": 4, "val_split": 0.2, "multi_gpu": True, "gpus": "all",
                "tracking": ["None", "mlflow"], "model_filename": ["pretrained.pt", "model.pt"]}
    got = train_request({"model": "m"}, defaults)
    assert got == {"model": "m", "device": "cpu", "model_filename": "pretrained.pt", "gpus": "all", "max_epochs": 4,
                   "val_split": 0.2, "pretrained": True, "multi_gpu": True, "tracking": "None", "run_id": "run"}
    gpu = train_request({"device": "NVIDIA H100:1", "max_epochs": "2", "pretrained": "false"}, defaults, {"NVIDIA H100:1": "cuda:1"})
    assert gpu == {**got, "model": "", "device": "cuda:1", "max_epochs": 2, "pretrained": False}
    for bad in ({"device": "$__import__('os').system('id')"}, {"max_epochs": "$1"}, {"model_filename": "../x.pt"},
                {"gpus": "0;rm"}, {"tracking_uri": "$open('x')"}, {"val_split": 2}, {"tracking": "@x"}):
        with pytest.raises(ValueError):
            train_request(bad, defaults)
    # the bundle's WiSE-FT weight: its own value by default, a number in [0, 1] from a request, never code
    assert train_request({}, {**defaults, "wise": 0.75})["wise"] == 0.75
    assert train_request({"wise": "1"}, {**defaults, "wise": 0.75})["wise"] == 1.0
    for bad in ({"wise": "$0.5"}, {"wise": 1.5}, {"wise": "half"}):
        with pytest.raises(ValueError, match="wise"):
            train_request(bad, {**defaults, "wise": 0.75})
    # adapting: from trained weights only, and on one device (the multi-GPU training has no check)
    adapting = train_request({"multi_gpu": "true"}, {**defaults, "adapt": True})
    assert adapting["adapt"] is True and adapting["multi_gpu"] is False
    assert train_request({"adapt": "false"}, {**defaults, "adapt": True})["multi_gpu"] is True
    with pytest.raises(ValueError, match="scratch"):
        train_request({"pretrained": "false"}, {**defaults, "adapt": True})


_TRAIN_TASK_PROBE = """
import json, sys
from monailabel.tasks.train.bundle import BundleTrainTask
from medhybrid.label.tasks import MedhybridTrain
class Store:  # the two datastore calls the task makes: one study nobody has labelled
    def get_unlabeled_images(self, tag): return ["u1"]
    def get_image_uri(self, image_id): return "/studies/" + image_id + ".png"
# a request goes through the task's own __call__ (its typing and checks); MONAI Label's training run is replaced by the
# overrides it would pass to the bundle
BundleTrainTask.__call__ = lambda self, request, datastore: self._update_overrides({})
out = {}
for path in sys.argv[1:]:
    task = MedhybridTrain(path, {})
    handlers = json.loads(open(path + "/configs/train.json").read())["train"]["handlers"]
    kept, scratch = [dict(h) for h in handlers], [dict(h) for h in handlers]
    task._load_checkpoint(path + "/models/pretrained.pt", True, kept)
    task._load_checkpoint(path + "/models/pretrained.pt", False, scratch)
    overrides = task({"wise": "0.5"}, Store())
    out[path] = {"default": task.config().get("wise"), "kept": [h["_target_"] for h in kept],
                 "scratch": [h["_target_"] for h in scratch], "overrides": overrides}
print(json.dumps(out))
"""

_ADAPT_PROBE = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO)
from monailabel.tasks.train.bundle import BundleTrainTask
from medhybrid.label.tasks import MedhybridTrain
class Store:
    def get_unlabeled_images(self, tag): return []
    def get_image_uri(self, image_id): return "/studies/" + image_id + ".png"
seen = {}
def run(self, request, datastore):  # MONAI Label's training: the overrides it passes; the bundle's run decides "start"
    self._load_checkpoint(os.path.join(self.bundle_path, "models", request["model_filename"]), True, [])
    seen.update(self._update_overrides({}))
    os.makedirs(self.bundle_path + "/eval/adapt", exist_ok=True)
    with open(self.bundle_path + "/eval/adapt/outcome.json", "w") as f:
        json.dump({"decision": "start", "reason": "kept the start: no candidate gains", "replaced": False, "labels": 3,
                   "start": seen["adapt_start"], "report": "report.md"}, f)
    return {}
BundleTrainTask.__call__ = run
task = MedhybridTrain(sys.argv[1], {})
result = task({}, Store())
print(json.dumps({"config": {k: task.config()[k] for k in ("adapt", "model_filename")}, "overrides": seen,
                  "result": result}))
"""


@pytest.mark.label
def test_train_task_adapts_from_the_served_model_and_reports_the_decision(tmp_path):
    """A bundle that adapts (``adapt: true``): MONAI Label's train task offers the served ``model.pt`` first as the
    start, passes it to the bundle as ``adapt_start``, and its train result says what the bundle decided (here: keep,
    so the served weights stay; the bundle's run, which writes that outcome and keeps or replaces the weights, is
    tested in tests/test_adapt.py)."""
    if not LABEL_PYTHON.is_file():
        pytest.fail(f"{LABEL_PYTHON} not found: the MONAI Label environment is made by scripts/setup_label.sh", pytrace=False)
    bundle = tmp_path / DERM.name
    shutil.copytree(DERM, bundle, ignore=shutil.ignore_patterns("eval", "runs"))
    res = subprocess.run([str(LABEL_PYTHON), "-c", _ADAPT_PROBE, str(bundle)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["config"]["adapt"] is True and got["config"]["model_filename"][0] == "model.pt"
    assert got["overrides"]["adapt"] is True
    assert got["overrides"]["adapt_start"] == str(bundle / "models" / "model.pt")
    assert got["result"]["adapt"] == {"decision": "start", "reason": "kept the start: no candidate gains", "replaced": False,
                                      "labels": 3, "start": str(bundle / "models" / "model.pt")}
    assert "the served model was kept" in res.stderr + res.stdout


@pytest.mark.label
def test_train_task_passes_wise_and_drops_it_from_scratch():
    """MONAI Label's train task (in its own environment) offers the bundle's ``wise`` as a setting, passes a request's
    value on as the bundle override, keeps the WiSE-FT handler behind the loader when training starts from weights,
    and drops it with the loader from scratch (it would pull the trained weights towards a random start)."""
    if not LABEL_PYTHON.is_file():
        pytest.fail(f"{LABEL_PYTHON} not found: the MONAI Label environment is made by scripts/setup_label.sh", pytrace=False)
    res = subprocess.run([str(LABEL_PYTHON), "-c", _TRAIN_TASK_PROBE, str(DERM), str(CHEST)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for bundle in (DERM, CHEST):
        shipped = json.loads((bundle / "configs" / "train.json").read_text())["wise"]
        r = got[str(bundle)]
        assert r["default"] == shipped
        assert r["kept"][:2] == ["CheckpointLoader", "medhybrid.engines.handlers.WiSEFT"]
        assert "CheckpointLoader" not in r["scratch"] and "medhybrid.engines.handlers.WiSEFT" not in r["scratch"]
        assert len(r["scratch"]) == len(r["kept"]) - 2
        assert r["overrides"]["wise"] == 0.5  # the request's "0.5", typed
        assert r["overrides"]["unlabelled_datalist"] == [{"image": "/studies/u1.png"}]
    assert got[str(DERM)]["default"] == 0.75 and got[str(CHEST)]["default"] == 1.0  # as measured: docs/results/bundle-wise


# --------------------------------------------------------------------------------------------- the real server
@pytest.fixture
def label_server(tmp_path, write_dicom):
    """The real MONAI Label server with the medhybrid app (both shipped bundles) on 127.0.0.1, over a studies folder
    of 3 PH2 PNGs, the RGB DICOM of another PH2 image and a real DX chest DICOM; the dermoscopy bundle serves its
    pretraining until the first training. Stopped after the test."""
    if not LABEL_PYTHON.is_file():
        pytest.fail(f"{LABEL_PYTHON} not found: the MONAI Label environment is made by scripts/setup_label.sh", pytrace=False)
    studies = tmp_path / "studies"
    studies.mkdir()
    ids = _pool(4, start=10)
    for sid in ids[:3]:
        shutil.copy(PH2 / "images" / f"{sid}.png", studies / f"{sid}.png")
    write_dicom(studies / f"{ids[3]}.dcm", np.asarray(Image.open(PH2 / "images" / f"{ids[3]}.png")))
    shutil.copy(DICOM / "nih_cxr14_dx_1024.dcm", studies / "cxr.dcm")
    # the dermoscopy model served at first is the ISIC pretraining alone, as before a site's first labels
    served = studies / ".medhybrid" / "bundles" / DERM.name
    shutil.copytree(DERM, served, ignore=shutil.ignore_patterns("eval", "runs"))
    shutil.copy(DERM / "models" / "pretrained.pt", served / "models" / "model.pt")
    port = free_port()
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"), "PYTHONUNBUFFERED": "1",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    # as the docs start it: scripts/serve_label.sh, without --host (its default, loopback only)
    cmd = ["bash", str(REPO_ROOT / "scripts" / "serve_label.sh"), str(studies), "--port", str(port)]
    server = f"http://127.0.0.1:{port}"
    with running_server(cmd, f"{server}/info/", tmp_path / "server.log", "MONAI Label server", env=env, cwd=tmp_path):
        assert _listening(port) == {"127.0.0.1"}, "the server must listen on the loopback interface alone"
        yield server, studies, ids, tmp_path / "server.log"


def test_serve_label_names_what_is_wrong_before_starting(tmp_path):
    res = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "serve_label.sh"), str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and f"{tmp_path / 'nowhere'} is not a folder" in res.stderr


def _listening(port: int) -> set[str]:
    """The local addresses with a socket listening on TCP ``port`` (IPv4 and IPv6), read from /proc/net."""
    import ipaddress

    out = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word in host order
            out.add(str(ipaddress.ip_address(raw)) if width == 8 else str(ipaddress.IPv6Address(raw)))
    return out


@pytest.mark.label
@pytest.mark.slow(seconds=120)
def test_label_server_serves_both_bundles(label_server, tmp_path):
    """Driven by MONAI Label's own client (tests/label_client.py, run in the MONAI Label environment)."""
    import highdicom as hd

    server, studies, ids, log = label_server
    labels = {}
    for sid in ids[:3]:
        labels[sid] = tmp_path / "upload" / f"{sid}.png"
        labels[sid].parent.mkdir(exist_ok=True)
        Image.fromarray(_truth(sid)).save(labels[sid])  # class indices, as a viewer saves a label
    plan = {"server": server, "workdir": str(tmp_path / "client"), "derm": DERM.name, "chest": CHEST.name, "png": ids[:3],
            "dicom": {ids[3]: DERM.name, "cxr": CHEST.name}, "labels": {k: str(v) for k, v in labels.items()},
            "train": {"max_epochs": 2, "val_split": 0.0, "adapt": False}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    run = subprocess.run([str(LABEL_PYTHON), str(REPO_ROOT / "tests" / "label_client.py"), str(tmp_path / "plan.json"),
                          str(tmp_path / "result.json")], capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:] + log.read_text()[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())

    info = r["info"]
    names = {DERM.name, CHEST.name}
    assert set(info["models"]) == names and set(info["trainers"]) == names
    assert info["labels"] == {"lesion": 1, "lung": 1} and list(info["strategies"]) == ["random", "first", "uncertainty"]
    assert info["datastore"]["total"] == 5  # the DICOM files are studies too
    assert (studies / ".medhybrid" / "bundles" / DERM.name / "models" / "model.pt").is_file()  # served from a copy

    # two annotators asking one after the other never hold the same study
    for strategy, (a, b) in r["next"].items():
        assert a and b and a != b, strategy

    # a PNG study gets a PNG of class indices at its size; a DICOM study a DICOM SEG referencing it
    before = {}
    for sid in ids[:3]:
        mask = np.asarray(Image.open(r["before"][sid]["file"]))
        assert r["before"][sid]["file"].endswith(".png") and mask.shape == _truth(sid).shape and set(np.unique(mask)) <= {0, 1}
        before[sid] = _dice(mask, _truth(sid))
    assert min(before.values()) > 0.3, before  # the ISIC pretraining alone, before any PH2 label
    for sid, src, name in [(ids[3], studies / f"{ids[3]}.dcm", "lesion"), ("cxr", studies / "cxr.dcm", "Lung")]:
        seg = hd.seg.segread(r["dicom"][sid]["file"])
        ref = pydicom.dcmread(src, stop_before_pixels=True)
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == ref.StudyInstanceUID
        assert (ref.StudyInstanceUID, ref.SeriesInstanceUID, ref.SOPInstanceUID) in seg.get_source_image_uids()
        assert (seg.Rows, seg.Columns) == (ref.Rows, ref.Columns)
        described = seg.SegmentSequence[0]
        assert name in (described.SegmentLabel, described.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
    lungs = pydicom.dcmread(r["dicom"]["cxr"]["file"]).pixel_array > 0
    assert 0.1 < lungs.mean() < 0.6

    # labels saved; the next samples are the unlabelled studies, one per annotator
    assert {sid: v for sid, v in r["saved"].items()} == {sid: {"image": sid, "label": sid} for sid in ids[:3]}
    assert sorted(r["next_after_labels"]) == sorted([ids[3], "cxr"])

    # training with the train task's own settings: the bundle adapts by default, starting from the served model.pt
    # (tests/test_adapt.py and the train-task probe above check that path); this request trains it plainly, and the
    # next inference serves the new weights
    assert r["info"]["trainers"][DERM.name]["config"]["adapt"] is True
    assert r["train_request"]["model_filename"][0] == "model.pt" and r["train_request"]["adapt"] is False
    assert r["train_status"]["status"] == "DONE", json.dumps(r["train_status"])[-3000:] + log.read_text()[-3000:]
    # the two studies nobody labelled fed the bundle's semi-supervised recipe beside the three labels
    semi = json.loads((DERM / "configs" / "train.json").read_text())["semi_algorithm"]
    assert f"semi-supervised fine-tuning ({semi}): 3 labelled, 2 unlabelled images" in log.read_text()
    served = studies / ".medhybrid" / "bundles" / DERM.name / "models" / "model.pt"
    assert sha256(served) != sha256(DERM / "models" / "pretrained.pt")  # retrained in the served copy
    shipped = yaml.safe_load((DERM / "large_files.yml").read_text())["large_files"]
    assert all(sha256(DERM / f["path"]) == f["hash_val"] for f in shipped)  # the shipped bundle is untouched
    after = {sid: _dice(np.asarray(Image.open(r["after"][sid]["file"])), _truth(sid)) for sid in ids[:3]}
    print(f"Dice against the saved labels: before training {before}, after {after}")
    assert np.mean(list(after.values())) > np.mean(list(before.values())), (before, after)


def _medhybrid_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Every medhybrid module ``module`` imports, directly or through others (read from the source, module level and
    function bodies alike)."""
    import ast

    seen = set() if seen is None else seen
    path = REPO_ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = REPO_ROOT / module.replace(".", "/") / "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for name in names:
            if name.startswith("medhybrid") and name not in seen:
                seen.add(name)
                _medhybrid_imports(name, seen)
    return seen


def test_the_annotation_app_imports_inference_and_scoring_only():
    """The MONAI Label app stands on the inference pipeline and the scoring module: nothing of the experiment stack
    (ablation, pretraining, fine-tuning, active-learning experiments, reports, plots) and not Ray."""
    used = set()
    for m in ("medhybrid.label.main", "medhybrid.label.tasks", "medhybrid.label.workspace"):
        used |= _medhybrid_imports(m)
    assert {"medhybrid.workflows.inference", "medhybrid.workflows.quality"} <= used
    stack = {"medhybrid.experiments.ablation", "medhybrid.workflows.pretrain", "medhybrid.workflows.finetune",
             "medhybrid.experiments.active", "medhybrid.experiments.report", "medhybrid.data.visualize",
             "medhybrid.experiments.pixel_features", "medhybrid.workflows.fewshot", "medhybrid.engines.semi",
             "medhybrid.core.tracking"}
    assert not used & stack, sorted(used & stack)
    code = "import sys, medhybrid.label.workspace, medhybrid.workflows.inference, medhybrid.workflows.quality; print('ray' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False", res.stderr[-2000:]
