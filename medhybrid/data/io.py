"""Readers for 2D medical images: PNG/JPEG/BMP/TIFF, DICOM, NIfTI and what SimpleITK reads.

Every reader returns the pixels in *row-major display order*: an array of shape ``(H, W)`` or
``(H, W, C)``, exactly as a viewer shows the file, never transposed or flipped. A PNG and the
same pixels wrapped as DICOM load to the same array.

:class:`Image2DReader` plugs these readers into MONAI's :class:`monai.transforms.LoadImage` as an
:class:`monai.data.ImageReader`; the transforms in :mod:`medhybrid.data.transforms` use it that way.
Each reader also reports ``value_range``: the range the stored values can take (bit depth after the
DICOM modality LUT), which intensity normalisation uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from monai.data import ImageReader
from monai.utils import MetaKeys
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medhybrid.core.files import _in_chain

try:
    from pydicom.pixels import apply_color_lut, apply_modality_lut
except ImportError:  # pydicom 2 (the MONAI Label environment, which needs pydicom<3)
    from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
SUPPORTED_SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES + SITK_SUFFIXES


class DataError(ValueError):
    """A problem with an input file, reported with the file's path."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def file_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix, with ``.nii.gz`` kept whole."""
    name = str(path).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def image_stem(path: str | os.PathLike) -> str:
    """File name without its (known, possibly double: ``.nii.gz``) suffix."""
    name = Path(path).name
    suffix = file_suffix(name)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else Path(name).stem


def _integer_range(dtype: np.dtype) -> tuple[float, float]:
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)


def _value_range(arr: np.ndarray) -> tuple[float, float]:
    if np.issubdtype(arr.dtype, np.integer):
        return _integer_range(arr.dtype)
    if arr.dtype == bool:
        return 0.0, 1.0
    return float(np.min(arr)), float(np.max(arr))


def reduction_factor(shape: Sequence[int], reduce_to: int | None) -> int:
    """The largest of 8, 4, 2 by which an image of ``shape`` (H, W, ...) can be shrunk while its short side stays at
    least ``reduce_to`` pixels (1: decode at full size). 8 is the smallest scale JPEG decoders offer."""
    if not reduce_to:
        return 1
    short = min(int(shape[0]), int(shape[1]))
    return next((f for f in (8, 4, 2) if short // f >= reduce_to), 1)


def _block_mean(arr: np.ndarray, f: int) -> np.ndarray:
    """``arr`` (H, W[, C]) shrunk by ``f`` by averaging f x f blocks (the last H % f rows and W % f columns dropped),
    as float32: the one full-size array is the decoded one, in its own dtype."""
    h, w = arr.shape[0] // f, arr.shape[1] // f
    blocks = arr[: h * f, : w * f].reshape(h, f, w, f, *arr.shape[2:])
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def read_pil(path: Path, role: str = "image", reduce_to: int | None = None) -> tuple[np.ndarray, dict]:
    """Decode a PNG/JPEG/BMP/TIFF file. With ``reduce_to`` (images only), a large image is decoded at reduced size
    (:func:`reduction_factor`): a JPEG by its decoder's DCT scaling (draft mode, a fraction of the full decode's
    work), other formats by Pillow's box reduction of the decoded 8-bit pixels; ``original_shape`` in the metadata
    keeps the file's own (H, W)."""
    try:
        with Image.open(path) as im:
            mode, fmt = im.mode, im.format
            full = (im.size[1], im.size[0])
            f = reduction_factor(full, reduce_to) if role == "image" else 1
            if f > 1 and fmt == "JPEG" and mode in ("L", "RGB"):
                im.draft(mode, (im.size[0] // f, im.size[1] // f))  # Pillow picks the scale from these floors
            if role == "image":
                if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA"):
                    im = im.convert("RGB")
                elif mode in ("LA", "1"):
                    im = im.convert("L")
            elif mode in ("1", "LA"):
                im = im.convert("L")
            elif mode == "RGBA":
                im = im.convert("RGB")
            if f > 1 and (im.size[1], im.size[0]) == full and im.mode in ("L", "RGB"):  # no draft: Pillow's box filter
                im = im.reduce(f)
            arr = np.asarray(im)  # forces the full decode: truncated files fail here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode image ({type(e).__name__}: {e})") from e
    if mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    elif mode == "I":
        vmin, vmax = int(arr.min()), int(arr.max())
        if vmin >= 0 and vmax < 65536:
            arr = arr.astype(np.uint16)
    vr = (0.0, 1.0) if arr.dtype == bool else _value_range(arr)
    if mode == "I" and arr.dtype == np.int32:
        vr = (float(arr.min()), float(arr.max()))
    if f > 1 and arr.shape[:2] == full and arr.dtype != bool:  # 16-bit and float modes: averaged blocks
        arr = _block_mean(arr, f)
    meta_extra = {"original_shape": full} if arr.shape[:2] != full else {}
    return arr, {"format": "pil", "pil_format": fmt or "", "mode": mode, "value_range": vr, **meta_extra}


_reading = threading.local()


class _WhileReading(logging.Filter):
    """Drops pydicom's log records in a thread that is inside :func:`quiet_pydicom`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_reading, "depth", 0)


_FILTERED = threading.Event()


def _filter_pydicom() -> None:
    """Install, once and on first use (importing medhybrid changes no global state), the filter that drops pydicom's
    records inside :func:`quiet_pydicom`, and ignore pydicom's ``UserWarning`` about damaged files: the reader's
    :class:`DataError` names the problem."""
    if _FILTERED.is_set():
        return
    _FILTERED.set()
    for name in ("pydicom", "pydicom.pixels.decoders.base"):  # a logger's filter does not see its children's records
        logging.getLogger(name).addFilter(_WhileReading())
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom logs each failing decoder's traceback (and logs about damaged files) before raising: in this thread,
    inside this context, those records are dropped, so that a bad file is one line of medhybrid's (:func:`one_line`)."""
    _filter_pydicom()
    _reading.depth = getattr(_reading, "depth", 0) + 1
    try:
        yield
    finally:
        _reading.depth -= 1


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line: pydicom puts stack traces and one line per decoder in its
    messages; the first line of each decoder's reason is kept."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "^"))][:4]
    text = "; ".join(lines)
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def read_dicom(path: Path, role: str = "image", reduce_to: int | None = None) -> tuple[np.ndarray, dict]:
    """Decode a single-frame DICOM image.

    Applies the modality LUT (Rescale Slope/Intercept), inverts MONOCHROME1 so that higher values are
    brighter, and reports the value range implied by Bits Stored (after rescale and inversion).
    Compressed transfer syntaxes (JPEG, JPEG 2000, RLE) decode through pydicom's pixel handlers
    (pylibjpeg plugins).
    """
    ds = open_dicom(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(path, "DICOM file has no pixel data (no PixelData element)")
    try:
        with quiet_pydicom():
            arr = ds.pixel_array
    except Exception as e:  # decoders raise many types (missing plugin, truncated stream)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(path, f"cannot decode DICOM pixel data, transfer syntax {syntax} ({one_line(e)})") from e
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(path, f"multi-frame DICOM ({frames} frames); medhybrid reads single 2D images")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    meta: dict[str, Any] = {"format": "dicom", "photometric": photometric}
    if photometric == "PALETTE COLOR":  # indices into the Red/Green/Blue Palette Color LUTs: look them up
        try:
            arr = np.asarray(apply_color_lut(arr, ds))
        except Exception as e:
            raise DataError(path, f"PALETTE COLOR image whose palette cannot be applied ({type(e).__name__}: {e})") from e
        meta["value_range"] = _value_range(arr)
    elif samples == 1:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo_raw, hi_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
        if has_rescale:
            arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
            ends = sorted((lo_raw * slope + intercept, hi_raw * slope + intercept))
            lo, hi = float(ends[0]), float(ends[1])
        else:
            lo, hi = float(lo_raw), float(hi_raw)
        if photometric == "MONOCHROME1":
            # inverted grey scale: map v -> lo + hi - v, so that the stored minimum becomes white
            if np.issubdtype(arr.dtype, np.integer):
                arr = (np.int64(lo) + np.int64(hi) - arr.astype(np.int64)).astype(arr.dtype)
            else:
                arr = np.float32(lo + hi) - arr
        meta.update(bits_stored=bits, rescale_slope=slope, rescale_intercept=intercept)
        meta["value_range"] = (lo, hi)
    else:
        # colour DICOM: pydicom converts YBR to RGB by default; planar configuration is handled there too
        arr = np.asarray(arr)
        meta["value_range"] = _value_range(arr)
    f = reduction_factor(arr.shape, reduce_to) if role == "image" else 1
    if f > 1:
        meta["original_shape"] = arr.shape[:2]
        arr = _block_mean(arr, f)
    return np.ascontiguousarray(arr), meta


# the JPEG family's start-of-frame markers -> the transfer syntax of an encapsulated stream that carries one
_JPEG_SYNTAX = {0xC0: "1.2.840.10008.1.2.4.50", 0xC1: "1.2.840.10008.1.2.4.51", 0xC3: "1.2.840.10008.1.2.4.70",
                0xF7: "1.2.840.10008.1.2.4.80"}


def encapsulated_syntax(pixel_data: bytes) -> str | None:
    """The transfer syntax of encapsulated pixel data, read from its first fragment's codestream: JPEG baseline,
    extended, lossless (SOF0, SOF1, SOF3), JPEG-LS (SOF55; near-lossless when the scan's NEAR > 0), JPEG 2000
    (SOC + SIZ); None when the data is not encapsulated or the stream is none of these."""
    if pixel_data[:4] != b"\xfe\xff\x00\xe0":  # the Basic Offset Table item opens every encapsulated pixel data
        return None
    bot_len = int.from_bytes(pixel_data[4:8], "little")
    frag = pixel_data[8 + bot_len + 8 : 8 + bot_len + 8 + 65536]
    if frag[:4] == b"\xff\x4f\xff\x51":
        return "1.2.840.10008.1.2.4.90"
    syntax, i = None, 2 if frag[:2] == b"\xff\xd8" else None
    while i is not None and i + 4 <= len(frag) and frag[i] == 0xFF:
        marker, length = frag[i + 1], int.from_bytes(frag[i + 2 : i + 4], "big")
        if marker in _JPEG_SYNTAX and syntax is None:
            syntax = _JPEG_SYNTAX[marker]
        if marker == 0xDA:  # start of scan: JPEG-LS keeps NEAR after the component selectors
            ns = frag[i + 4] if i + 4 < len(frag) else 0
            near = frag[i + 5 + 2 * ns] if i + 5 + 2 * ns < len(frag) else 0
            if syntax == "1.2.840.10008.1.2.4.80" and near > 0:
                syntax = "1.2.840.10008.1.2.4.81"
            break
        i += 2 + length
    return syntax


def open_dicom(path: Path, stop_before_pixels: bool = False):
    """Read a DICOM dataset. A file without the Part 10 preamble or file meta header (older modalities, some PACS
    exports) is read as a bare dataset; its transfer syntax is then taken from how the elements are encoded, or from
    the codestream of encapsulated (compressed) pixel data."""
    with quiet_pydicom():
        return _open_dicom(path, stop_before_pixels)


def _open_dicom(path: Path, stop_before_pixels: bool):
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as first:
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
        except Exception as e:
            raise DataError(path, f"not a readable DICOM file ({one_line(first)})") from e
        if len(ds) == 0 or ("SOPClassUID" not in ds and "PixelData" not in ds and "Rows" not in ds):
            raise DataError(path, f"not a readable DICOM file ({one_line(first)})") from first
    except (OSError, EOFError, ValueError) as e:
        raise DataError(path, f"not a readable DICOM file ({one_line(e)})") from e
    meta = ds.file_meta if hasattr(ds, "file_meta") else pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is None:  # pydicom 2
            implicit, little = ds.is_implicit_VR, ds.is_little_endian
        syntax = encapsulated_syntax(bytes(ds.PixelData)) if "PixelData" in ds else None
        syntax = syntax or ("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
        meta.TransferSyntaxUID = UID(syntax)
        ds.file_meta = meta
    return ds


def read_nifti(path: Path, role: str = "image", reduce_to: int | None = None) -> tuple[np.ndarray, dict]:
    """Read a 2D NIfTI image. NIfTI stores (i, j) = (column, row) order, so the array is transposed
    to (row, column) to match what SimpleITK and the PNG readers return."""
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise DataError(path, f"cannot read NIfTI file ({type(e).__name__}: {e})") from e
    while arr.ndim > 2 and arr.shape[2] == 1:
        arr = arr.reshape(arr.shape[:2] + arr.shape[3:])
    if arr.ndim == 2:
        arr = arr.T
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = np.transpose(arr, (1, 0, 2))[..., :3]
    else:
        raise DataError(path, f"NIfTI image has shape {arr.shape}; medhybrid reads 2D images (optionally RGB)")
    return np.ascontiguousarray(arr), {"format": "nifti", "value_range": _value_range(arr)}


def read_sitk(path: Path, role: str = "image", reduce_to: int | None = None) -> tuple[np.ndarray, dict]:
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)  # (rows, columns[, components]) for 2D
    except RuntimeError as e:
        raise DataError(path, f"SimpleITK cannot read the file ({str(e).strip().splitlines()[-1]})") from e
    if img.GetDimension() == 3:
        if img.GetSize()[2] != 1:
            raise DataError(path, f"3D image of size {img.GetSize()}; medhybrid reads 2D images")
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        raise DataError(path, f"image has {arr.shape[2]} components per pixel; expected 1, 3 or 4")
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[2] == 1 else arr[..., :3]
    return np.ascontiguousarray(arr), {"format": "sitk", "value_range": _value_range(arr)}


_READERS = {
    **dict.fromkeys(PIL_SUFFIXES, read_pil),
    **dict.fromkeys(DICOM_SUFFIXES, read_dicom),
    **dict.fromkeys(NIFTI_SUFFIXES, read_nifti),
    **dict.fromkeys(SITK_SUFFIXES, read_sitk),
}


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file, whatever its name (PACS exports often store DICOM files without a suffix): a
    Part 10 file (a 128-byte preamble, then ``DICM``), or a bare dataset without preamble and file meta header that
    opens with a group 0008 element (little endian, explicit or implicit VR) and parses as an image's dataset."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:] == b"DICM":
        return True
    explicit = head[4:6].isalpha() and head[4:6].isupper()
    if len(head) < 8 or head[:2] != b"\x08\x00" or not (explicit or int.from_bytes(head[4:8], "little") < 4096):
        return False
    try:
        ds = open_dicom(Path(path), stop_before_pixels=True)
    except DataError:
        return False
    return "SOPClassUID" in ds or "Rows" in ds


def reader_for(path: str | os.PathLike):
    """The reader of ``path``: by suffix, else DICOM for a file that starts like one (None: not an image file)."""
    reader = _READERS.get(file_suffix(path))
    if reader is None and is_dicom_file(path):
        return read_dicom
    return reader


def read_image(path: str | os.PathLike, role: str = "image", reduce_to: int | None = None) -> tuple[np.ndarray, dict]:
    """Read one 2D image as ``(H, W)`` or ``(H, W, C)`` plus metadata, choosing the reader by suffix (a DICOM file
    is recognised by its content whatever its name).

    ``role`` is ``"image"`` (palette/alpha images become RGB/grey) or ``"mask"`` (raw values kept). ``reduce_to``
    lets the PIL and DICOM readers decode a large image at reduced size (never a mask): its short side stays at least
    ``reduce_to`` pixels, and ``meta["original_shape"]`` is the file's own (H, W) (absent when not reduced).
    Raises :class:`DataError` naming the file for a missing, unreadable or unsupported file.
    """
    path = Path(path)
    reader = reader_for(path)
    if reader is None:
        if not path.is_file() and file_suffix(path) == "":
            raise DataError(path, "file not found")
        raise DataError(path, f"unsupported file type {file_suffix(path)!r} (and not a DICOM file); "
                              f"supported: {', '.join(SUPPORTED_SUFFIXES)} or DICOM without a suffix")
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    arr, meta = reader(path, role, reduce_to)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise DataError(path, f"decoded to an array of shape {arr.shape}; expected a 2D image")
    meta["spatial_shape"] = np.asarray(arr.shape[:2])
    return arr, meta


def file_channels(path: str | os.PathLike) -> int | None:
    """1 (grey) or 3 (colour) as the file stores it, from its header where the format allows (PNG/JPEG/..., DICOM),
    else from a full decode; None for a file that cannot be read (the data check reports it)."""
    reader = reader_for(path)
    try:
        if reader is read_pil:
            with Image.open(path) as im:
                return 1 if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;") else 3
        if reader is read_dicom:
            ds = open_dicom(Path(path), stop_before_pixels=True)
            photometric = str(ds.get("PhotometricInterpretation", "")).upper()
            return 3 if int(ds.get("SamplesPerPixel", 1)) > 1 or photometric == "PALETTE COLOR" else 1
        if reader is not None:
            arr = read_image(path)[0]
            return 1 if arr.ndim == 2 else 3
    except Exception:  # an unreadable file has no say; the data check names it
        return None
    return None


class Image2DReader(ImageReader):
    """MONAI :class:`~monai.data.ImageReader` over :func:`read_image` (all supported 2D formats).

    Returns channel-last arrays in display order; use with ``LoadImage(..., ensure_channel_first=True)``.
    """

    def __init__(self, role: str = "image", reduce_to: int | None = None):
        super().__init__()
        self.role, self.reduce_to = role, reduce_to

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = filename if isinstance(filename, (list, tuple)) else [filename]
        return all(reader_for(f) is not None for f in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> Any:
        names = data if isinstance(data, (list, tuple)) else [data]
        if len(names) != 1:
            raise ValueError(f"Image2DReader reads one file at a time, got {len(names)}")
        return read_image(names[0], self.role, self.reduce_to)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        arr, meta = img
        meta = dict(meta)
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(arr.shape[:2])
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1 if arr.ndim == 3 else float("nan")
        meta["value_range"] = np.asarray(meta["value_range"], dtype=np.float64)
        if "original_shape" in meta:
            meta["original_shape"] = np.asarray(meta["original_shape"])
        return arr, meta


def data_error(exc: BaseException) -> DataError | None:
    """The :class:`DataError` behind ``exc``: itself, or the first one in its chain of causes (MONAI's ``Compose`` and
    ``LoadImage`` wrap a reader's error in their own); None when there is none."""
    return _in_chain(exc, lambda e: isinstance(e, DataError))




