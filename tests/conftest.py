"""Shared fixtures for the data-layer tests.

Real data is read from ``../shared/data`` beside the repository (never copied into it); small synthetic
files are written to pytest's ``tmp_path`` from real pixels. A missing data folder is a failure, not a
skip: CI always has it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
def _write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                 slope: float | None = None, intercept: float | None = None) -> Path:
    """A minimal valid single-frame DICOM (Secondary Capture, explicit VR little endian) holding ``arr``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.ascontiguousarray(arr)
    assert arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16, np.int16)
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
    ds.Modality = "OT"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(arr.dtype, np.signedinteger) else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def write_dicom() -> Callable[..., Path]:
    """``write_dicom(path, arr, photometric=..., bits_stored=..., slope=..., intercept=...)``."""
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
    from medhybrid.config import load_dataset_spec

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
    # MONAI probes for a GPU DICOM decoder each time a LoadImage is built; medhybrid quiets the warning on
    # import, but pytest resets warning filters per test.
    config.addinivalue_line("filterwarnings", "ignore:.*nvImageCodec.*:UserWarning")
