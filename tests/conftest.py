"""Shared fixtures for the data-layer and training tests.

Real data is read from ``../shared/data`` beside the repository (never copied into it); small synthetic
files are written to pytest's ``tmp_path`` from real pixels. A missing data folder is a failure, not a
skip: CI always has it. Training tests use tiny dataset YAMLs over the real folders, a tiny U-Net at
32 px, their own SQLite MLflow store in ``tmp_path`` and ``tmp_path`` as the working folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medhybrid.networks.nets import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data"

PH2 = DATA / "dermoscopy" / "ph2"
ISIC = DATA / "dermoscopy" / "isic2018"
V7 = DATA / "chest_xray" / "v7_covid"
OPENIST = DATA / "chest_xray" / "openist"
DICOM = DATA / "dicom"


@pytest.fixture(scope="session")
def data() -> Path:
    """The shared data folder; fails (does not skip) when it is absent."""
    for folder in (PH2, ISIC, V7, OPENIST, DICOM):
        if not folder.is_dir():
            pytest.fail(f"shared data folder {folder} not found: the data-layer tests need {DATA} "
                        "(see ../shared/data/README.md)", pytrace=False)
    return DATA


@pytest.fixture(autouse=True)
def _no_data_root_override(monkeypatch):
    """The shipped dataset configs must resolve their default root (``../shared/data``) in these tests."""
    monkeypatch.delenv("MEDHYBRID_DATA_ROOT", raising=False)
    monkeypatch.delenv("MEDHYBRID_CONFIG_DIR", raising=False)


# --------------------------------------------------------------------------------------------- real files
@pytest.fixture(scope="session")
def ph2_pair(data) -> tuple[Path, Path]:
    """A real PH2 pair: RGB PNG 287x384 (HxW, non-square) and its {0,255} mask."""
    return PH2 / "images" / "IMD002.png", PH2 / "masks" / "IMD002_lesion.png"


@pytest.fixture(scope="session")
def openist_pair(data) -> tuple[Path, Path]:
    """A real OpenIST pair (grey JPEG) whose mask is anti-aliased (has values strictly between 0 and 255)."""
    for mask in sorted((OPENIST / "masks").glob("*_mask.png")):
        m = np.asarray(Image.open(mask))
        if ((m > 0) & (m < 255)).any():
            return OPENIST / "images" / (mask.name[: -len("_mask.png")] + ".jpg"), mask
    pytest.fail("no anti-aliased OpenIST mask found")


@pytest.fixture(scope="session")
def v7_ignore_pair(data) -> tuple[Path, Path]:
    """A real V7 pair whose mask holds the ignore value 127 (devices over the lung)."""
    for mask in sorted((V7 / "masks").glob("*_mask.png")):
        if (np.asarray(Image.open(mask)) == 127).any():
            return V7 / "images" / (mask.name[: -len("_mask.png")] + ".png"), mask
    pytest.fail("no V7 mask with value 127 found")


@pytest.fixture(scope="session")
def grey_pixels(openist_pair) -> np.ndarray:
    """Real grey pixels, uint8, 40x72 (HxW): non-square and asymmetric, so a transpose or flip would show."""
    arr = np.asarray(Image.open(openist_pair[0]).convert("L"))[100:140, 150:222].copy()
    assert arr.shape == (40, 72) and not np.array_equal(arr, arr[::-1]) and not np.array_equal(arr, arr[:, ::-1])
    return arr


@pytest.fixture(scope="session")
def rgb_pixels(ph2_pair) -> np.ndarray:
    """Real RGB pixels, uint8, 36x60x3 (HxW, non-square)."""
    arr = np.asarray(Image.open(ph2_pair[0]).convert("RGB"))[120:156, 150:210].copy()
    assert arr.shape == (36, 60, 3)
    return arr


# --------------------------------------------------------------------------------------------- writers
def _write_dicom(path: Path, arr: np.ndarray, photometric: str | None = None, bits_stored: int | None = None,
                 slope: float | None = None, intercept: float | None = None, spacing: float | None = None) -> Path:
    """A minimal valid single-frame DICOM (Secondary Capture, explicit VR little endian) holding ``arr``: grey (H, W)
    uint8/uint16/int16 (MONOCHROME2 unless told), or RGB (H, W, 3) uint8, interleaved, as a camera stores it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.ascontiguousarray(arr)
    rgb = arr.ndim == 3
    assert (arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16, np.int16)) or (rgb and arr.shape[2] == 3 and arr.dtype == np.uint8)
    bits_allocated = arr.dtype.itemsize * 8
    uid = generate_uid(entropy_srcs=[str(path)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(path), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(path), "series"])
    ds.Modality = "OT"
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if rgb else "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(arr.dtype, np.signedinteger) else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if spacing is not None:
        ds.PixelSpacing = [spacing, spacing]
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def write_dicom() -> Callable[..., Path]:
    """``write_dicom(path, arr, photometric=..., bits_stored=..., slope=..., intercept=..., spacing=...)``."""
    return _write_dicom


@pytest.fixture
def write_png() -> Callable[[Path, np.ndarray], Path]:
    def write(path: Path, arr: np.ndarray) -> Path:
        Image.fromarray(np.ascontiguousarray(arr)).save(path)
        return path

    return write


# --------------------------------------------------------------------------------------------- tiny datasets
TINY_POOL = ["IMD003", "IMD004"]
TINY_TEST = ["IMD002", "IMD006"]
TINY_OVERRIDES = ["channels=3", "mask_suffix=_lesion", "role=target"]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Overrides that complete a folder spec for :func:`tiny_dataset` (a folder cannot say these)."""
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny_dataset(data, tmp_path) -> Path:
    """Four real PH2 pairs (pool IMD003, IMD004; test IMD002, IMD006) plus split.json, in tmp_path/ph2tiny."""
    root = tmp_path / "ph2tiny"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for sid in TINY_POOL + TINY_TEST:
        shutil.copy(PH2 / "images" / f"{sid}.png", root / "images")
        shutil.copy(PH2 / "masks" / f"{sid}_lesion.png", root / "masks")
    (root / "split.json").write_text(json.dumps({"pool": TINY_POOL, "test": TINY_TEST}))
    return root


@pytest.fixture
def tiny_spec(tiny_dataset, tiny_overrides):
    from medhybrid.data.specs import load_dataset_spec

    return load_dataset_spec(tiny_dataset, tiny_overrides)


# --------------------------------------------------------------------------------------------- corruptions
def _missing_mask(root: Path) -> tuple[str, str]:
    (root / "masks" / "IMD004_lesion.png").unlink()
    return "IMD004_lesion.png", "file not found"


def _corrupt_image(root: Path) -> tuple[str, str]:
    (root / "images" / "IMD003.png").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return "IMD003.png", "cannot decode image"


def _truncated_image(root: Path) -> tuple[str, str]:
    f = root / "images" / "IMD006.png"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    return "IMD006.png", "truncated"


def _dicom_without_pixels(root: Path) -> tuple[str, str]:
    import pydicom

    ds = pydicom.dcmread(DICOM / "nih_cxr14_dx_1024.dcm")
    del ds.PixelData
    (root / "images" / "IMD003.png").unlink()
    ds.save_as(root / "images" / "IMD003.dcm")
    return "IMD003.dcm", "no pixel data"


def _mask_size_differs(root: Path) -> tuple[str, str]:
    f = root / "masks" / "IMD002_lesion.png"
    with Image.open(f) as im:
        small = im.resize((im.width // 2, im.height // 2), Image.NEAREST)
    small.save(f)
    return "IMD002_lesion.png", "differs from image size"


def _mask_unexpected_values(root: Path) -> tuple[str, str]:
    f = root / "masks" / "IMD004_lesion.png"
    m = np.asarray(Image.open(f)).copy()
    m[:5, :5] = 128
    Image.fromarray(m).save(f)
    return "IMD004_lesion.png", "unexpected values 128"


def _empty_dataset(root: Path) -> tuple[str, str]:
    for f in (root / "images").iterdir():
        f.unlink()
    return "ph2tiny", "dataset is empty"


def _id_in_pool_and_test(root: Path) -> tuple[str, str]:
    (root / "split.json").write_text(json.dumps({"pool": TINY_POOL, "test": [*TINY_TEST, "IMD003"]}))
    return "split.json", "'IMD003' is in both 'pool' and 'test'"


CORRUPTIONS: dict[str, Callable[[Path], tuple[str, str]]] = {
    "missing_mask": _missing_mask,
    "corrupt_image": _corrupt_image,
    "truncated_image": _truncated_image,
    "dicom_without_pixels": _dicom_without_pixels,
    "mask_size_differs": _mask_size_differs,
    "mask_unexpected_values": _mask_unexpected_values,
    "empty_dataset": _empty_dataset,
    "id_in_pool_and_test": _id_in_pool_and_test,
}


def pytest_generate_tests(metafunc):
    if "corruption" in metafunc.fixturenames:
        metafunc.parametrize("corruption", list(CORRUPTIONS))


@pytest.fixture
def broken_dataset(tiny_dataset, corruption) -> tuple[Path, str, str]:
    """:func:`tiny_dataset` with one thing broken: ``(root, file named in the problem, problem text)``."""
    name, problem = CORRUPTIONS[corruption](tiny_dataset)
    return tiny_dataset, name, problem


def pytest_configure(config):
    # MONAI probes for a GPU DICOM decoder each time a LoadImage is built and warns without one; medhybrid's
    # LoadImage2D silences it around its own LoadImage, this covers MONAI transforms built directly in tests.
    config.addinivalue_line("filterwarnings", "ignore:.*nvImageCodec.*:UserWarning")
    # The models here are tiny: one CPU thread per process is fastest, and on a busy machine several
    # threads per process are many times slower (threads spin waiting for each other). Subprocesses
    # (CLI runs, distributed workers) inherit OMP_NUM_THREADS.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Start every xdist worker on its longest tests. Kept because pytest-xdist's ``worksteal`` (pyproject's addopts)
    does not order by duration: it deals the collection in contiguous shares (each worker in turn
    ``len(left) // workers left``), and an idle worker steals the second half of the longest queue *by count*, so a
    ``slow`` test collected near the end of a share starts late and runs on alone at the end of the suite. Simulated
    with the ``slow(seconds=...)`` figures and short tests for the rest, dealing the slow tests longest first to the
    front of each share shortens the 3-worker suite by 3-5 % (by 15 % when the Ray smoke took 300 s), next to the
    10-minute budget. Deterministic, as xdist requires every worker to collect the same order; a no-op under ``-n 0``."""
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if n < 2 or len(items) < n:
        return
    seconds = {it: it.get_closest_marker("slow").kwargs.get("seconds", 30) for it in items if it.get_closest_marker("slow")}
    slow = sorted(seconds, key=seconds.get, reverse=True)
    rest = [it for it in items if it not in seconds]
    order = []
    for k in range(n):
        size = (len(items) - len(order)) // (n - k)  # worker k's share, as worksteal splits the collection
        share = slow[k::n]
        take = max(0, size - len(share))
        order += share + rest[:take]
        del rest[:take]
    items[:] = order + rest


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


CPU_LOG = os.path.abspath(os.environ["MEDHYBRID_TEST_CPU_LOG"]) if os.environ.get("MEDHYBRID_TEST_CPU_LOG") else None
"""With ``MEDHYBRID_TEST_CPU_LOG=<file>``, each test appends a JSON line to that file (:func:`pytest_runtest_protocol`)."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With :data:`CPU_LOG`, one JSON line per test: its id, wall seconds and CPU seconds (setup, call and teardown; this
    process and the descendants it reaped, so daemons such as Ray's and servers stopped by signal are left out). On a
    CPU-bound suite the CPU seconds say what a test costs; its wall time also counts the time it waited for the cores."""
    if CPU_LOG is None:
        return (yield)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    try:
        return (yield)
    finally:
        row = {"test": item.nodeid, "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_cpu_seconds() - cpu, 2),
               "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}
        with open(CPU_LOG, "a") as fh:  # one short line per write: appends from the workers do not interleave
            fh.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------- training runs
# Tiny sources and targets: dataset YAMLs in tmp_path that point at the real folders, with a split JSON in
# tmp_path listing a few ids of the real split (the images are read in place, never copied).
TINY_NET = ["preprocess.resolution=32", "model.channels=[16,32,32]", "model.attention_levels=[false,false,false]"]
"""Overrides of a PretrainConfig for the tiny U-Net every training test uses."""

TINY_UNET = ModelConfig(channels=(16, 32, 32), attention_levels=(False, False, False))
"""The same tiny U-Net as a :class:`medhybrid.networks.nets.ModelConfig`, for tests that build networks directly."""

TINY_TRAIN = ["train.batch_size=4", "train.epochs=4", "train.epoch_length=4", "train.lr=1e-3", "train.warmup_iterations=0",
              "train.val_max_images=4", "train.check_data=false", "train.device=cpu", "train.progress=false"]
"""A short CPU schedule: 4 epochs x 4 iterations of 4 images."""


def write_dataset_yaml(folder: Path, name: str, root: Path, split: dict[str, list[str]], **fields) -> Path:
    """``folder/<name>.yaml`` for the real dataset ``root`` with its split written to ``folder/<name>_split.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    split_file = folder / f"{name}_split.json"
    split_file.write_text(json.dumps(split))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "root": str(root), "split": str(split_file), **fields}, sort_keys=False))
    return path


def real_split(root: Path) -> dict[str, list[str]]:
    return json.loads((root / "split.json").read_text())


def isic_yaml(folder: Path, n_train: int = 16, n_val: int = 4, name: str = "isic_tiny") -> Path:
    """A source dataset of the first ``n_train`` train and ``n_val`` val ids of the real ISIC 2018 split."""
    s = real_split(ISIC)
    return write_dataset_yaml(folder, name, ISIC, {"train": s["train"][:n_train], "val": s["val"][:n_val]},
                              role="source", mask_suffix="_segmentation", channels=3)


def ph2_yaml(folder: Path, n_pool: int = 8, n_test: int = 4, name: str = "ph2_tiny") -> Path:
    """A target dataset of the first ``n_pool`` pool and ``n_test`` test ids of the real PH2 split."""
    s = real_split(PH2)
    return write_dataset_yaml(folder, name, PH2, {"pool": s["pool"][:n_pool], "test": s["test"][:n_test]},
                              role="target", mask_suffix="_lesion", channels=3)


@pytest.fixture(scope="session")
def v7_ids(data) -> dict[str, list[str]]:
    """8 train and 4 val V7 ids, the ones whose masks hold the ignore value 127 first."""
    s = real_split(V7)
    out = {}
    for split, n in (("train", 8), ("val", 4)):
        ids = s[split][:60]
        has_ignore = [i for i in ids if (np.asarray(Image.open(V7 / "masks" / f"{i}_mask.png")) == 127).any()]
        assert len(has_ignore) >= 2, f"expected V7 {split} masks with the ignore value 127"
        out[split] = (has_ignore + [i for i in ids if i not in has_ignore])[:n]
    return out


@pytest.fixture
def isic_tiny(data, tmp_path) -> Path:
    """Dataset YAML: 16 train / 4 val real ISIC 2018 pairs (RGB, source)."""
    return isic_yaml(tmp_path / "datasets")


@pytest.fixture
def v7_tiny(v7_ids, tmp_path) -> Path:
    """Dataset YAML: 8 train / 4 val real V7 pairs (grey, masks with ignore value 127, source)."""
    return write_dataset_yaml(tmp_path / "datasets", "v7_tiny", V7, v7_ids, role="source", mask_suffix="_mask",
                              channels=1, mask={"values": {0: 0, 255: 1}, "ignore": [127]})


@pytest.fixture
def ph2_tiny(data, tmp_path) -> Path:
    """Dataset YAML: 8 pool / 4 test real PH2 pairs (RGB, non-square, target)."""
    return ph2_yaml(tmp_path / "datasets")


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its schema created once (creating it costs seconds per test)."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    with contextlib.chdir(db.parent):  # MLflow's "Default" experiment keeps its artifacts in <cwd>/mlruns
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def mlflow_store(template: Path, folder: Path) -> str:
    """A fresh MLflow store ``folder/mlflow.db`` (artifacts beside it in ``folder/mlruns``): its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def mlflow_uri(mlflow_template, tmp_path) -> str:
    """``sqlite:///<tmp_path>/mlflow.db``: every run of a test is tracked there, never in the working folder."""
    return mlflow_store(mlflow_template, tmp_path)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in tmp_path (whatever a run writes relative to the working folder lands there, never in the
    repository), with no MLflow tracking URI leaking in from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def pretrain_cfg(workdir, mlflow_uri):
    """``pretrain_cfg(dataset_yaml, mode, *overrides, out="run")``: a tiny :class:`PretrainConfig` writing to
    ``tmp_path/<out>`` and tracking in ``tmp_path/mlflow.db``; later overrides win."""
    from medhybrid.core.config import load_config
    from medhybrid.workflows.pretrain import PretrainConfig

    def make(dataset: Path, mode: str = "hybrid", *overrides: str, out: str = "run"):
        ov = [f"dataset={dataset}", f"mode={mode}", f"output_dir={workdir / out}", f"mlflow.tracking_uri={mlflow_uri}",
              *TINY_NET, *TINY_TRAIN, *overrides]
        return load_config(PretrainConfig, None, ov)

    return make


@contextlib.contextmanager
def as_own_process(cwd: Path, argv: list[str] | None = None, env: dict | None = None, merged: bool = False):
    """Run a program's entry point in this process as if it were a process of its own: in ``cwd``, with ``argv`` and
    ``env`` on top of this environment, its stdout and stderr collected in the two ``io.StringIO`` yielded (one, when
    ``merged``: the order of a terminal's lines); afterwards the
    working folder, environment, ``sys.argv``, ``sys.path``, every logger's level, handlers and propagation (a bundle's
    logging.conf configures the root logger; scripts add handlers to ``medhybrid``) and torch's thread count are put
    back."""
    import io
    import logging

    import torch

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    saved_loggers = [(lg, lg.level, lg.handlers[:], lg.propagate, lg.disabled) for lg in loggers]
    saved = (dict(os.environ), sys.argv, sys.path[:], torch.get_num_threads())
    out = io.StringIO()
    err = out if merged else io.StringIO()
    os.environ.update(env or {})
    if argv is not None:
        sys.argv = argv
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out if merged else (out, err)
    finally:
        environ, sys.argv, sys.path[:], threads = saved
        os.environ.clear()
        os.environ.update(environ)
        for lg in logging.Logger.manager.loggerDict.values():  # loggers made meanwhile: as logging makes them
            if isinstance(lg, logging.Logger) and lg not in loggers:
                lg.setLevel(logging.NOTSET)
                lg.handlers[:], lg.propagate, lg.disabled = [], True, False
        for lg, level, handlers, propagate, disabled in saved_loggers:
            lg.setLevel(level)
            lg.handlers[:], lg.propagate, lg.disabled = handlers, propagate, disabled
        torch.set_num_threads(threads)


def exit_status(run) -> tuple[int, str]:
    """``run()``'s exit status as a process would have it (a ``SystemExit``'s code; 1 for another exception) and what
    it would print on the way out (an exit message, a traceback)."""
    import traceback

    try:
        run()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0, ""
        return 1, str(e.code)
    except Exception:
        return 1, traceback.format_exc()
    return 0, ""


@dataclasses.dataclass
class BundleRun:
    """What a bundle run printed (its log and progress, stdout and stderr together) and its exit status."""

    returncode: int
    log: str


def bundle_command(configs: list[str], *args: str) -> list[str]:
    """``run --config_file "['configs/<c>.json', ...]" --meta_file configs/metadata.json --logging_file
    configs/logging.conf <args>``: what follows ``python -m monai.bundle`` for a run in a bundle's folder."""
    files = "[" + ",".join(f"'configs/{c}.json'" for c in configs) + "]"
    return ["run", "--config_file", files, "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
            *args]


def run_bundle(bundle: Path, configs: list[str], *args: str, check: bool = True) -> BundleRun:
    """``python -m monai.bundle run --config_file "['configs/<c>.json', ...]" --meta_file configs/metadata.json
    --logging_file configs/logging.conf <args>``, in this process (:func:`as_own_process`): the same entry point (Fire
    over ``monai.bundle.run``, as ``monai/bundle/__main__.py`` calls it, so ``--wise 0`` or ``--adapt_rule "{...}"``
    are parsed as on the command line), with the bundle folder as the working directory. ``check`` asserts exit status
    0. ``tests/test_bundle_install.py`` runs the command line itself, in a fresh environment; torchrun's launch is in
    ``tests/test_bundle.py``."""
    import warnings

    import fire
    from monai.bundle import run

    command = bundle_command(configs, *args)
    with as_own_process(bundle, merged=True) as out, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "parsing config_file", UserWarning)  # MONAI's notice that configs run code
        code, last = exit_status(lambda: fire.Fire({"run": run}, command=command, name="monai.bundle"))
        out.write(last)
    assert code == 0 or not check, f"monai.bundle {' '.join(command)} in {bundle} exited {code}:\n{out.getvalue()[-5000:]}"
    return BundleRun(code, out.getvalue())


def cli_env(**extra: str) -> dict:
    """The environment of a ``python -m medhybrid.cli`` child process: this checkout importable, the suite's thread
    count, no tracking URI leaking in from the environment; ``extra`` on top."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def mlflow_client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def child_runs(uri: str, parent: str) -> list:
    """The MLflow runs whose parent is ``parent`` (an ablation's fine-tunes, an active-learning experiment's steps)."""
    from medhybrid.core.tracking import child_runs as children

    return children(mlflow_client(uri), parent)


def artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, recursively."""
    out = []
    for a in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, a.path) if a.is_dir else [a.path]
    return sorted(out)


@contextlib.contextmanager
def running_server(cmd: list[str], ready_url: str, log_path: Path, what: str, timeout: float = 180, **popen):
    """Start ``cmd`` (its own process group, output in ``log_path``), wait until ``ready_url`` answers, yield the
    process; stop the whole group afterwards (SIGTERM, then SIGKILL after 20 s)."""
    import signal
    import subprocess
    import time
    import urllib.request

    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"{what} did not start:\n{Path(log_path).read_text()[-4000:]}", pytrace=False)
                time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


import medhybrid.cli  # noqa: E402, F401 - the CLI's imports too, for STARTUP_MODULES

STARTUP_MODULES = {name: f for name, mod in list(sys.modules.items()) if isinstance(f := getattr(mod, "__file__", None), str)}
"""Every module this test process had imported when conftest.py was read, with its file: what any test process
starts with (tests/test_install.py checks that setup wrote their bytecode)."""
