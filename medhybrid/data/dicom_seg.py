"""DICOM Segmentation objects (SEG) for masks predicted on single-frame DICOM images, written with highdicom.

A SEG written here references its source image (the Study, Series and SOP Instance UIDs, in the source's own
study), holds one binary segment per foreground class at the source's Rows x Columns, and names what it segments
with SNOMED CT codes, so that OHIF and 3D Slicer load it over the image it was made from.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.coding import Code

from medhybrid.core.files import atomic_write
from medhybrid.data.io import DataError, open_dicom

# SNOMED CT codes for the shipped tasks' segments; anything else is a generic "Tissue" of category "Tissue".
SEGMENT_CODES: dict[str, tuple[Code, Code]] = {
    "lesion": (Code("49755003", "SCT", "Morphologically Abnormal Structure"), Code("52988006", "SCT", "Lesion")),
    "lung": (Code("91723000", "SCT", "Anatomical Structure"), Code("39607008", "SCT", "Lung")),
    "lungs": (Code("91723000", "SCT", "Anatomical Structure"), Code("39607008", "SCT", "Lung")),
}
_TISSUE = (Code("85756007", "SCT", "Tissue"), Code("85756007", "SCT", "Tissue"))
_REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "ReferringPhysicianName", "AccessionNumber")
_AI = Code("123109", "DCM", "Artificial Intelligence")


def segment_description(number: int, name: str, algorithm: str, version: str) -> hd.seg.SegmentDescription:
    """One automatically segmented class, coded from :data:`SEGMENT_CODES` by its name."""
    category, kind = SEGMENT_CODES.get(name.lower(), _TISSUE)
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(name=algorithm, family=_AI, version=version),
    )


def write_dicom_seg(mask: np.ndarray, source: str | os.PathLike, path: str | os.PathLike,
                    labels: Mapping[str, int] | None = None, algorithm: str = "medhybrid", version: str = "1") -> Path:
    """Write the (H, W) class-index ``mask`` predicted on the DICOM file ``source`` as a binary DICOM SEG at ``path``.

    ``labels`` maps segment names to class indices (default ``{"foreground": 1}``); each non-empty or empty class
    becomes one segment. The SEG joins the source's study as a new series. Raises :class:`medhybrid.data.io.DataError`
    naming ``source`` when it is not a single-frame image of ``mask``'s size.
    """
    hd_log = logging.getLogger("highdicom")
    if hd_log.level == logging.NOTSET:  # highdicom's per-frame INFO lines, unless the user has set its level
        hd_log.setLevel(logging.WARNING)
    src = open_dicom(Path(source))
    missing = [k for k in _REFERENCED if not getattr(src, k, None)]
    if missing:
        raise DataError(source, f"has no {', '.join(missing)}: a DICOM SEG could not reference it")
    for k in _TYPE2:  # Type 2 attributes (present, possibly empty) that exports often leave out
        if k not in src:
            setattr(src, k, None)
    rows, cols = int(getattr(src, "Rows", 0)), int(getattr(src, "Columns", 0))
    if int(getattr(src, "NumberOfFrames", 1) or 1) != 1:
        raise DataError(source, "a DICOM SEG is written for single-frame images only")
    mask = np.asarray(mask)
    if mask.shape != (rows, cols):
        raise DataError(source, f"mask of {mask.shape} (HxW) does not match the image's {rows}x{cols}")
    labels = dict(labels or {"foreground": 1})
    names = sorted(labels, key=labels.get)
    # (frames, H, W, segments) binary, as highdicom takes it; a single-frame source is one frame
    stack = np.stack([(mask == labels[n]) for n in names], axis=-1)[None].astype(np.uint8)
    try:
        seg = _segmentation(src, stack, names, algorithm, version)
    except (AttributeError, ValueError, TypeError, KeyError) as e:  # highdicom's checks of the source image
        raise DataError(source, f"cannot be the source of a DICOM SEG ({type(e).__name__}: {e})") from e
    with atomic_write(path) as tmp:
        seg.save_as(tmp)
    return Path(path)


def _segmentation(src, stack: np.ndarray, names: list[str], algorithm: str, version: str) -> hd.seg.Segmentation:
    # highdicom logs every module it copies (INFO) and warns about the source's own name formats: one line per mask
    # is what a batch of hundreds should print
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _build(src, stack, names, algorithm, version)


def _build(src, stack: np.ndarray, names: list[str], algorithm: str, version: str) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=[src],
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(i + 1, n, algorithm, version) for i, n in enumerate(names)],
        series_instance_uid=hd.UID(),
        series_number=max(1, int(getattr(src, "SeriesNumber", 0) or 0) + 1000),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medhybrid",
        manufacturer_model_name=algorithm,
        software_versions=version,
        device_serial_number="0",
        series_description=f"{algorithm} segmentation",
    )


__all__ = ["SEGMENT_CODES", "segment_description", "write_dicom_seg"]
