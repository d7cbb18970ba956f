"""medhybrid.data.check: every pair opened as training will; problems named with their file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medhybrid.data.check import check_dataset, require_valid
from medhybrid.data.io import DataError
from medhybrid.data.specs import load_dataset_spec


def test_check_good_dataset(tiny_spec):
    report = check_dataset(tiny_spec)
    assert report.ok and report.problems == []
    assert report.pairs == 4 and dict(report.splits) == {"pool": 2, "test": 2}
    assert dict(report.file_channels) == {3: 4}
    assert sum(report.sizes.values()) == 4 and all(w == 384 for _, w in report.sizes)
    assert set(report.class_pixels) == {0, 1} and report.class_pixels[1] > 0
    assert report.ignored_pixels == 0 and report.empty_masks == 0
    text = report.format()
    assert text.startswith("dataset ph2tiny: 4 pairs") and "splits: pool 2, test 2" in text
    assert "channels in files: 3: 4" in text and "no problems found" in text
    assert require_valid(tiny_spec).pairs == 4


def test_check_selected_split(tiny_spec):
    report = check_dataset(tiny_spec, ["pool"], workers=1)
    assert report.ok and report.pairs == 2 and dict(report.splits) == {"pool": 2}


def test_check_finds_each_problem(broken_dataset, tiny_overrides):
    root, name, problem = broken_dataset
    spec = load_dataset_spec(root, tiny_overrides)
    report = check_dataset(spec, workers=2)
    assert not report.ok
    hits = [p for p in report.problems if name in p and problem in p]
    assert hits, f"no problem naming {name!r} with {problem!r} in {report.problems}"
    assert "PROBLEMS" in report.format() and hits[0] in report.format()
    with pytest.raises(DataError, match="failed its check") as info:
        require_valid(spec)
    assert name in str(info.value) and problem in str(info.value)


def test_check_counts_ignored_pixels(v7_ignore_pair, tmp_path):
    root = tmp_path / "v7tiny"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for sid in ("a", "b"):  # the same real pair twice: one for train, one for val
        shutil.copy(v7_ignore_pair[0], root / "images" / f"{sid}.png")
        shutil.copy(v7_ignore_pair[1], root / "masks" / f"{sid}_mask.png")
    (root / "split.json").write_text(json.dumps({"train": ["a"], "val": ["b"]}))
    spec = load_dataset_spec(root, ["channels=1", "mask_suffix=_mask", "mask.ignore=[127]"])
    report = check_dataset(spec)
    assert report.ok, report.problems
    raw = np.asarray(Image.open(v7_ignore_pair[1]))
    assert report.ignored_pixels == 2 * int((raw == 127).sum())
    assert report.class_pixels[1] == 2 * int((raw == 255).sum()) and report.class_pixels[0] == 2 * int((raw == 0).sum())
    assert "ignored" in report.format() and dict(report.file_channels) == {1: 2}
    # without declaring 127 as ignored, the same masks are problems
    report = check_dataset(load_dataset_spec(root, ["channels=1", "mask_suffix=_mask"]))
    assert len(report.problems) == 2
    assert "a_mask.png: mask has unexpected values 127" in report.problems[0]


def test_check_problem_list_is_capped(tiny_spec):
    from medhybrid.data.check import CheckReport

    report = CheckReport("x", problems=[f"/f{i}.png: broken" for i in range(60)])
    text = report.format()
    assert "PROBLEMS (60)" in text and "/f49.png" in text and "/f50.png" not in text and "... and 10 more" in text


@pytest.mark.slow
def test_shipped_datasets_check_clean(data):
    expected = {
        "isic2018": (2594, {"train": 2334, "val": 260}, 3),
        "ph2": (200, {"pool": 100, "test": 100}, 3),
        "v7_covid": (418, {"train": 376, "val": 42}, 1),
        "openist": (275, {"pool": 100, "test": 175}, 1),
    }
    for name, (count, splits, channels) in expected.items():
        report = check_dataset(load_dataset_spec(name))
        assert report.problems == [], f"{name}: {report.problems[:5]}"
        assert report.pairs == count, name
        assert dict(report.splits) == splits, name
        assert dict(report.file_channels) == {channels: count}, name
        assert report.empty_masks == 0, name
        assert (report.ignored_pixels > 0) == (name == "v7_covid"), name


def test_pacs_folder_with_damaged_dicom_names_each_in_one_line_without_pydicom_tracebacks(data, tmp_path):
    """Real DICOM (CR uncompressed, JPEG 2000, DX) beside a JPEG 2000 file with a damaged codestream header and one
    cut short: pydicom's decoders log a traceback per failing plugin; the check prints one line per bad file only."""
    import subprocess
    import sys

    for f in (data / "dicom").glob("*.dcm"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    j2k = bytearray((data / "dicom" / "RG1_J2KI.dcm").read_bytes())
    at = j2k.find(b"\xff\x4f\xff\x51")
    j2k[at + 4 : at + 60] = b"\xab" * 56
    (tmp_path / "damaged.dcm").write_bytes(bytes(j2k))
    (tmp_path / "cut.dcm").write_bytes(bytes(j2k[:5000]))
    res = subprocess.run([sys.executable, "-m", "medhybrid.cli", "data", "check", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "Traceback" not in out and "pydicom" not in out, out[-3000:]
    for name in ("damaged.dcm", "cut.dcm"):
        assert sum(name in line for line in out.splitlines()) == 1, (name, out[-3000:])
