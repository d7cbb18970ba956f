"""medhybrid.data.dicom_seg: DICOM SEG results that reference their source image, on real and synthetic DICOM files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import DICOM

from medhybrid.data.dicom_seg import write_dicom_seg
from medhybrid.data.io import DataError, read_image

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")


def _ref(seg) -> str:
    return seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "nih_cxr14_dx_1024.dcm"])
def test_seg_of_a_real_chest_xray_references_it(tmp_path, name):
    src = DICOM / name
    h, w = read_image(src)[0].shape[:2]
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 5 : w // 3] = 1
    out = write_dicom_seg(mask, src, tmp_path / "seg.dcm", {"lung": 1}, algorithm="chest", version="1.0.0")
    seg, ref = pydicom.dcmread(out), pydicom.dcmread(src, stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == ref.StudyInstanceUID and seg.SeriesInstanceUID != ref.SeriesInstanceUID
    assert _ref(seg) == ref.SOPInstanceUID
    assert (seg.Rows, seg.Columns) == (h, w)
    assert np.array_equal(seg.pixel_array.astype(bool), mask.astype(bool))
    s = seg.SegmentSequence[0]
    assert s.SegmentLabel == "lung" and s.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # SNOMED CT Lung
    assert s.SegmentAlgorithmType == "AUTOMATIC" and s.SegmentAlgorithmName == "chest"
    assert not list(tmp_path.glob(".*.tmp"))


def test_seg_of_an_rgb_secondary_capture_without_patient_module(tmp_path, write_dicom, rgb_pixels):
    src = write_dicom(tmp_path / "rgb.dcm", rgb_pixels)  # no patient or study attributes, as many exports
    mask = np.zeros(rgb_pixels.shape[:2], np.uint8)
    mask[5:20, 5:30] = 1
    seg = pydicom.dcmread(write_dicom_seg(mask, src, tmp_path / "seg.dcm", {"lesion": 1}))
    assert _ref(seg) == pydicom.dcmread(src).SOPInstanceUID
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    assert int(seg.pixel_array.sum()) == int(mask.sum())


def test_problems_are_named(tmp_path, write_dicom, grey_pixels):
    src = write_dicom(tmp_path / "g.dcm", grey_pixels)
    with pytest.raises(DataError, match=r"g\.dcm.*does not match"):
        write_dicom_seg(np.zeros((3, 3), np.uint8), src, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(src)
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "nouid.dcm")
    with pytest.raises(DataError, match="nouid.dcm.*SOPInstanceUID"):
        write_dicom_seg(np.zeros(grey_pixels.shape, np.uint8), tmp_path / "nouid.dcm", tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_savemask_writes_png_and_seg_and_survives_a_dicom_without_uids(tmp_path, write_dicom, grey_pixels, caplog):
    import torch
    from monai.data import MetaTensor

    from medhybrid.data.transforms import SaveMask2Dd

    good = write_dicom(tmp_path / "good.dcm", grey_pixels)
    ds = pydicom.dcmread(good)
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "bare.dcm")
    mask = torch.zeros((1, *grey_pixels.shape))
    mask[0, 2:9, 3:12] = 1
    save = SaveMask2Dd("pred", tmp_path / "out", dicom_seg=True, labels={"lung": 1})
    for name in ("good.dcm", "bare.dcm"):
        save({"pred": mask.clone(), "image": MetaTensor(torch.zeros(1, 2, 2), meta={"filename_or_obj": str(tmp_path / name)})})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bare_mask.png", "good_mask.png", "good_seg.dcm"]
    assert "bare.dcm" in caplog.text and "StudyInstanceUID" in caplog.text
    png = read_image(tmp_path / "out" / "good_mask.png", "mask")[0]
    assert set(np.unique(png)) == {0, 255} and np.array_equal(png > 0, mask[0].numpy() > 0)
