"""MONAI transforms for 2D images and masks, each in an array form and a dictionary form.

Conventions after :func:`preprocessing`:

- ``image``: float32 ``(C, S, S)`` in ``[-1, 1]``, ``C`` = 1 (grey) or 3 (RGB) as the dataset states,
  whatever the file holds.
- ``label``: float32 ``(1, S, S)`` class indices ``0..K-1``; :data:`IGNORE_INDEX` marks pixels that
  losses and metrics must skip (V7's devices over the lung, padding added by ``aspect: pad``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCrop,
    Compose,
    InvertibleTransform,
    LoadImage,
    MapTransform,
    Resize,
    Resized,
    ScaleIntensity,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    SpatialPad,
    SpatialPadd,
    Transform,
)
from monai.utils import TraceKeys
from PIL import Image

from medhybrid.core.files import atomic_write
from medhybrid.data.io import DataError, Image2DReader, image_stem, is_dicom_file

log = logging.getLogger("medhybrid")

IGNORE_INDEX = -1.0
"""Label value of pixels excluded from losses and metrics."""

Aspect = Literal["stretch", "pad", "crop"]
Intensity = Literal["fixed", "minmax", "percentile"]


@contextlib.contextmanager
def _quiet_decoder_probe():
    """MONAI's ``LoadImage`` builds every reader it knows; its ``NvImgCodecPydicomReader`` probes for a GPU DICOM decoder
    (nvImageCodec) and, without one, logs and warns. medhybrid decodes DICOM with pydicom (:mod:`medhybrid.data.io`), so
    both are noise: silenced here, around that construction only."""
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _filename(img) -> str | None:
    return img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None


# --------------------------------------------------------------------------------------------- loading
class ToChannels(Transform):
    """Convert a channel-first image to ``channels`` channels: RGB -> grey by ITU-R 601 luma,
    grey -> RGB by repetition; an alpha channel is dropped."""

    def __init__(self, channels: int):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[0]
        if c == 4:
            img, c = img[:3], 3
        if c == self.channels:
            return img
        if c == 1 and self.channels == 3:
            return img.repeat(3, 1, 1)
        if c == 3 and self.channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype, device=img.device).view(3, 1, 1)
            return (img * w).sum(0, keepdim=True)
        raise DataError(_filename(img), f"image has {c} channels; cannot convert to {self.channels}")


def _resize_back(img: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a channel-first (C, H, W) image or logits to ``size``, keeping a MetaTensor's metadata and
    its remaining transform stack (an inverse step must not record itself)."""
    x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
    out = F.interpolate(x[None].float(), size=tuple(int(v) for v in size), mode="bilinear", align_corners=False)[0]
    return MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations) if isinstance(img, MetaTensor) else out


def _popped(transform: InvertibleTransform, img: torch.Tensor) -> dict | None:
    """The transform record that ``transform`` pushed on ``img``, popped; None when the last record is another's (a
    step that did nothing to this image, e.g. a small file decoded at full size, records nothing)."""
    ops = img.applied_operations if isinstance(img, MetaTensor) else []
    if not ops or ops[-1].get(TraceKeys.CLASS_NAME) != type(transform).__name__:
        return None
    return transform.pop_transform(img, check=False)


class LoadImage2D(InvertibleTransform):
    """Load a 2D image file (any format of :mod:`medhybrid.data.io`) as a channel-first float32
    :class:`~monai.data.MetaTensor` in display orientation.

    Args:
        role: ``"image"`` or ``"mask"`` (mask values are kept raw).
        channels: for images, the number of channels to return (1 grey, 3 RGB); None keeps the file's.
        reduce_to: decode a large image at reduced size, its short side kept at least this many pixels
            (:func:`medhybrid.data.io.reduction_factor`: JPEG draft decoding, DICOM and other formats shrunk once after
            decoding); None decodes every pixel. Invertible: :meth:`inverse` (and MONAI's ``Invertd``) resizes a
            prediction on the reduced grid back to the file's own size.
    """

    def __init__(self, role: str = "image", channels: int | None = None, reduce_to: int | None = None):
        self.reader = Image2DReader(role, reduce_to if role == "image" else None)
        with _quiet_decoder_probe():
            self.loader = LoadImage(reader=self.reader, image_only=True, ensure_channel_first=True)
        self.to_channels = ToChannels(channels) if channels else None

    def __call__(self, filename) -> torch.Tensor:
        # the reader is passed per call so that MONAI uses it alone: a reader given only at construction is
        # tried first, and on failure MONAI falls back to its default readers, hiding the DataError
        img = self.loader(filename, reader=self.reader)
        img = self.to_channels(img) if self.to_channels else img
        original = img.meta.get("original_shape") if isinstance(img, MetaTensor) else None
        if original is not None:
            self.push_transform(img, orig_size=tuple(int(v) for v in original))
        return img

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        op = _popped(self, data)
        return data if op is None else _resize_back(data, op[TraceKeys.ORIG_SIZE])


class LoadImage2Dd(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`LoadImage2D`; ``label_keys`` are loaded as masks (never reduced)."""

    def __init__(self, keys: KeysCollection, label_keys: KeysCollection = (), channels: int | None = None,
                 reduce_to: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set(label_keys if isinstance(label_keys, (list, tuple)) else [label_keys])
        self.image_loader = LoadImage2D("image", channels, reduce_to)
        self.mask_loader = LoadImage2D("mask")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (self.mask_loader if key in self.label_keys else self.image_loader)(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.keys:
            if key in d and key not in self.label_keys:
                d[key] = self.image_loader.inverse(d[key])
        return d


# --------------------------------------------------------------------------------------------- masks
class MaskToLabel(Transform):
    """Map raw mask values to class indices, with ignored values set to :data:`IGNORE_INDEX`.

    Args:
        values: raw value -> class index (e.g. ``{0: 0, 255: 1}``); any other value is an error,
            unless ``threshold`` is set.
        ignore: raw values that mark regions to exclude (V7's 127).
        threshold: for anti-aliased binary masks: raw value >= threshold is class 1, else 0
            (after ``ignore`` values are taken out). A mask holding only 0 and 1 is a class-index label map (as
            annotation tools save them) and is taken as it is.
    """

    def __init__(self, values: Mapping[int, int] | None = None, ignore: Sequence[int] = (), threshold: float | None = None):
        if values is None and threshold is None:
            raise ValueError("MaskToLabel needs `values` or `threshold`")
        self.values = {int(k): int(v) for k, v in (values or {}).items()}
        self.ignore = [int(v) for v in ignore]
        self.threshold = threshold

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        name = _filename(mask)
        if mask.shape[0] > 1:
            if not bool((mask == mask[:1]).all()):
                raise DataError(name, f"mask has {mask.shape[0]} differing channels; expected a single-channel label map")
            mask = mask[:1]
        raw = torch.as_tensor(mask).round()
        out = torch.full_like(raw, IGNORE_INDEX, dtype=torch.float32)
        ignored = torch.zeros_like(raw, dtype=torch.bool)
        for v in self.ignore:
            ignored |= raw == v
        if self.threshold is not None:
            label_map = bool(((raw[~ignored] == 0) | (raw[~ignored] == 1)).all())
            fg = (raw >= (1 if label_map else self.threshold)) & ~ignored
            out[~ignored] = 0.0
            out[fg] = 1.0
        else:
            known = ignored.clone()
            for v, c in self.values.items():
                hit = raw == v
                out[hit] = float(c)
                known |= hit
            if not bool(known.all()):
                bad = torch.unique(raw[~known]).to(torch.int64).tolist()
                shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
                allowed = sorted(set(self.values) | set(self.ignore))
                raise DataError(name, f"mask has unexpected values {shown} (allowed: {allowed}); "
                                      "for anti-aliased masks set `mask.threshold`")
        out[ignored] = IGNORE_INDEX
        if isinstance(mask, MetaTensor):
            out = MetaTensor(out, meta=mask.meta)
        return out


class MaskToLabeld(MapTransform):
    """Dictionary form of :class:`MaskToLabel`. With ``ref_key`` it also checks that the mask has
    the image's size, before any resizing can hide the mismatch."""

    def __init__(self, keys: KeysCollection, values=None, ignore=(), threshold=None, ref_key: str | None = "image",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.convert = MaskToLabel(values, ignore, threshold)
        self.ref_key = ref_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if self.ref_key is not None and self.ref_key in d:
                ref, m = d[self.ref_key], d[key]
                if tuple(ref.shape[1:]) != tuple(m.shape[1:]):
                    raise DataError(_filename(m), f"mask size {tuple(m.shape[1:])} (HxW) differs from image size "
                                                  f"{tuple(ref.shape[1:])} of {_filename(ref)}")
            d[key] = self.convert(d[key])
        return d


# --------------------------------------------------------------------------------------------- intensity
class ScaleIntensity2D(Transform):
    """Scale intensities to ``[-1, 1]`` (MONAI's intensity transforms, clipped) from a range chosen by ``mode``:

    - ``fixed``: by the range the file's format allows (``value_range`` from the reader: 0..255 for
      8-bit files, the Bits Stored range after rescale for DICOM). Keeps the scanner's scale.
    - ``minmax``: by the image's own min and max (``ScaleIntensity``).
    - ``percentile``: by the image's ``lower``/``upper`` percentiles, clipped (``ScaleIntensityRangePercentiles``;
      robust to hot pixels).

    Under ``minmax`` and ``percentile`` a constant image maps to -1 everywhere.
    """

    def __init__(self, mode: Intensity = "fixed", lower: float = 0.5, upper: float = 99.5):
        self.mode, self.lower, self.upper = mode, lower, upper

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img.float()
        if self.mode == "fixed" and isinstance(img, MetaTensor) and "value_range" in img.meta:
            lo, hi = (float(v) for v in torch.as_tensor(img.meta["value_range"]).flatten()[:2])
            if hi <= lo:
                return (x - lo).clamp(0.0, 1.0) * 2.0 - 1.0
            return ScaleIntensityRange(lo, hi, b_min=-1.0, b_max=1.0, clip=True)(x)
        if bool(x.max() <= x.min()):  # a constant image has no range of its own: every pixel at the lower end, -1
            return x * 0.0 - 1.0
        if self.mode == "percentile":
            return ScaleIntensityRangePercentiles(self.lower, self.upper, b_min=-1.0, b_max=1.0, clip=True)(x)
        return ScaleIntensity(minv=-1.0, maxv=1.0)(x)


class ScaleIntensity2Dd(MapTransform):
    """Dictionary form of :class:`ScaleIntensity2D`."""

    def __init__(self, keys: KeysCollection, mode: Intensity = "fixed", lower: float = 0.5, upper: float = 99.5,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.norm = ScaleIntensity2D(mode, lower, upper)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.norm(d[key])
        return d


# --------------------------------------------------------------------------------------------- geometry
def aspect_size(shape: Sequence[int], size: int, aspect: Aspect) -> tuple[int, int]:
    """Intermediate (H, W) before padding/cropping to ``size x size``."""
    h, w = int(shape[0]), int(shape[1])
    if aspect == "stretch":
        return size, size
    scale = size / max(h, w) if aspect == "pad" else size / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


class ResizeAspect(Transform):
    """Resize a channel-first 2D image to ``size x size``.

    ``aspect``: ``stretch`` (squash to square), ``pad`` (keep aspect, fit the long side, pad the short
    side with ``pad_value``) or ``crop`` (keep aspect, fit the short side, centre-crop the long side).
    Labels use nearest-neighbour interpolation; images bilinear with anti-aliasing when shrinking.
    """

    def __init__(self, size: int, aspect: Aspect = "pad", label: bool = False, pad_value: float | None = None):
        self.size, self.aspect, self.label = int(size), aspect, label
        self.pad_value = (IGNORE_INDEX if label else -1.0) if pad_value is None else pad_value

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        hw = aspect_size(img.shape[1:], self.size, self.aspect)
        shrink = hw[0] < img.shape[1] or hw[1] < img.shape[2]
        if self.label:
            resize = Resize(hw, mode="nearest-exact")
        else:
            resize = Resize(hw, mode="bilinear", align_corners=False, anti_aliasing=shrink)
        out = resize(img)
        target = (self.size, self.size)
        if self.aspect == "pad":
            out = SpatialPad(target, mode="constant", value=self.pad_value)(out)
        elif self.aspect == "crop":
            out = CenterSpatialCrop(target)(out)
        return out


class CropAspect(InvertibleTransform):
    """The ``crop`` aspect as an invertible step of inference: :class:`ResizeAspect` (fit the short side, centre-crop
    the long one) whose :meth:`inverse` maps a prediction back to the input's size: the cropped-away border, which
    the network never saw, is filled by replicating the prediction's edge, then the whole is resized bilinearly.
    (``stretch`` and ``pad`` are MONAI's own invertible ``Resized`` and ``SpatialPadd``: :func:`model_geometry`.)"""

    def __init__(self, size: int):
        self.size = int(size)
        self.resize = ResizeAspect(size, "crop")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        hw = tuple(int(v) for v in img.shape[1:])
        out = self.resize(img)
        if not isinstance(out, MetaTensor):
            out = MetaTensor(out)
        if isinstance(img, MetaTensor):
            out.copy_meta_from(img)
        self.push_transform(out, orig_size=hw)
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        op = _popped(self, data)
        if op is None:
            return data
        h, w = op[TraceKeys.ORIG_SIZE]
        ih, iw = aspect_size((h, w), self.size, "crop")
        top, left = (ih - self.size) // 2, (iw - self.size) // 2
        x = data.as_tensor() if isinstance(data, MetaTensor) else data
        x = F.pad(x[None].float(), (left, iw - self.size - left, top, ih - self.size - top), mode="replicate")[0]
        x = MetaTensor(x, meta=data.meta, applied_operations=data.applied_operations) if isinstance(data, MetaTensor) else x
        return _resize_back(x, (h, w))


class CropAspectd(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`CropAspect`."""

    def __init__(self, keys: KeysCollection, size: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.crop = CropAspect(size)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.crop(d[key])
        return d

    def inverse(self, data):
        d = dict(data)
        for key in self.keys:
            if key in d:
                d[key] = self.crop.inverse(d[key])
        return d


def model_geometry(keys: KeysCollection, size: int, aspect: Aspect) -> list:
    """The invertible resize of inference for the image ``keys``: the same geometry as :class:`ResizeAspect`
    (bilinear, anti-aliased when shrinking), as MONAI's ``Resized`` (``stretch``; ``pad``: fit the long side, then
    ``SpatialPadd`` with -1, the black of [-1, 1]) or :class:`CropAspectd` (``crop``), so that ``Invertd`` maps a
    prediction back through it."""
    if aspect == "crop":
        return [CropAspectd(keys, size)]
    if aspect == "stretch":
        return [Resized(keys, (size, size), mode="bilinear", align_corners=False, anti_aliasing=True)]
    return [Resized(keys, size, size_mode="longest", mode="bilinear", align_corners=False, anti_aliasing=True),
            SpatialPadd(keys, (size, size), mode="constant", value=-1.0)]


class ResizeAspectd(MapTransform):
    """Dictionary form of :class:`ResizeAspect`; ``label_keys`` are resized as labels."""

    def __init__(self, keys: KeysCollection, size: int, aspect: Aspect = "pad", label_keys: KeysCollection = (),
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        label_keys = set(label_keys if isinstance(label_keys, (list, tuple)) else [label_keys])
        self.resizers = {k: ResizeAspect(size, aspect, label=k in label_keys) for k in self.keys}

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizers[key](d[key])
        return d


# --------------------------------------------------------------------------------------------- writing
class SaveMask2D(Transform):
    """Write a predicted (1, H, W) or (H, W) class-index mask of one 2D image into ``output_dir`` as
    ``<stem><postfix>.png`` (uint8; a binary mask as 0 / 255 with ``binary_png``, else the class indices); with
    ``nifti`` also ``<stem><postfix>.nii.gz`` (the class indices as a 2D NIfTI that :func:`medhybrid.data.io.read_image`
    reads back to the same array, identity affine); with ``dicom_seg``, for a DICOM source also
    ``<stem><seg_postfix>.dcm``: a DICOM SEG referencing the source (:func:`medhybrid.data.dicom_seg.write_dicom_seg`,
    segments named by ``labels``). Files are replaced atomically.

    ``source`` (the image file the mask was predicted on) names the outputs; by default the mask's own
    ``filename_or_obj``. Returns the mask unchanged; the paths written are in :attr:`written` and, for a
    MetaTensor, in its ``meta["saved_to"]``.
    """

    def __init__(self, output_dir: str, postfix: str = "_mask", binary_png: bool = True, dicom_seg: bool = False,
                 labels: Mapping[str, int] | None = None, seg_postfix: str = "_seg", nifti: bool = False):
        self.output_dir, self.postfix, self.binary_png, self.nifti = output_dir, postfix, binary_png, nifti
        self.dicom_seg, self.labels, self.seg_postfix = dicom_seg, dict(labels or {"foreground": 1}), seg_postfix
        self.written: list[str] = []

    def __call__(self, mask: torch.Tensor, source: str | None = None) -> torch.Tensor:
        source = source or _filename(mask)
        if not source:
            raise ValueError("SaveMask2D needs the source image's file name (meta 'filename_or_obj' or `source`)")
        arr = torch.as_tensor(mask).detach().cpu().numpy()
        arr = arr[0] if arr.ndim == 3 else arr
        arr = arr if arr.dtype == np.uint8 else np.rint(arr).astype(np.uint8)
        out_dir = Path(self.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = image_stem(source)
        png = out_dir / f"{stem}{self.postfix}.png"
        with atomic_write(png) as tmp:
            # compression level 1: a third of the default's time for a camera-size mask, which compresses well anyway
            Image.fromarray(arr * 255 if self.binary_png and arr.max(initial=0) <= 1 else arr, mode="L").save(
                tmp, format="PNG", compress_level=1)
        written = [str(png)]
        if self.nifti:
            img = nib.Nifti1Image(np.ascontiguousarray(arr.T), affine=np.eye(4))  # NIfTI's first axis is the column
            img.header.set_xyzt_units("mm")
            with atomic_write(out_dir / f"{stem}{self.postfix}.nii.gz") as tmp:
                nib.save(img, str(tmp))
            written.append(str(out_dir / f"{stem}{self.postfix}.nii.gz"))
        if self.dicom_seg and is_dicom_file(source):
            from medhybrid.data.dicom_seg import write_dicom_seg  # highdicom: loaded only when a DICOM SEG is asked for

            try:
                written.append(str(write_dicom_seg(arr, source, out_dir / f"{stem}{self.seg_postfix}.dcm", self.labels)))
            except DataError as e:  # e.g. a DICOM without the UIDs a SEG must reference: the PNG mask stands
                log.warning("no DICOM SEG for %s", e)
        self.written += written
        if isinstance(mask, MetaTensor):
            mask.meta["saved_to"] = written
        return mask


class SaveMask2Dd(MapTransform):
    """Dictionary form of :class:`SaveMask2D`: the source file is ``source_key``'s ``filename_or_obj`` (the image)."""

    def __init__(self, keys: KeysCollection, output_dir: str, source_key: str = "image", postfix: str = "_mask",
                 binary_png: bool = True, dicom_seg: bool = False, labels: Mapping[str, int] | None = None,
                 seg_postfix: str = "_seg", nifti: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.saver = SaveMask2D(output_dir, postfix, binary_png, dicom_seg, labels, seg_postfix, nifti)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            src = d.get(self.source_key)
            self.saver(d[key], _filename(src) if src is not None else None)
        return d


# --------------------------------------------------------------------------------------------- pipeline
def _reading(dataset, with_label: bool) -> list:
    """Read the image (and its mask, as class indices checked against the image) at native size."""
    keys, label_keys = (["image", "label"], ["label"]) if with_label else (["image"], [])
    steps: list = [LoadImage2Dd(keys, label_keys=label_keys, channels=dataset.channels)]
    if with_label:
        m = dataset.mask
        steps.append(MaskToLabeld("label", values=m.values, ignore=m.ignore, threshold=m.threshold, ref_key="image"))
    return steps


def _to_model(preprocess, with_label: bool) -> list:
    """Intensity normalisation of the image, then the aspect-aware resize (of the mask too, with ``with_label``)."""
    keys, label_keys = (["image", "label"], ["label"]) if with_label else (["image"], [])
    return [ScaleIntensity2Dd("image", preprocess.intensity, *preprocess.percentiles),
            ResizeAspectd(keys, preprocess.resolution, preprocess.aspect, label_keys=label_keys)]


def preprocessing(dataset, preprocess, with_label: bool = True) -> Compose:
    """The deterministic pipeline from file paths to model-ready tensors for ``dataset``
    (:class:`medhybrid.data.specs.DatasetSpec`) under ``preprocess`` (:class:`medhybrid.data.specs.Preprocess`)."""
    return Compose(_reading(dataset, with_label) + _to_model(preprocess, with_label))


def image_array(img: torch.Tensor) -> np.ndarray:
    """Channel-first tensor -> HxW(xC) numpy array, for writing or display."""
    a = torch.as_tensor(img).detach().cpu().numpy()
    return a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)


# MONAI's aliases of the dictionary forms (``LoadImage2DD``, ``LoadImage2DDict`` ...)
LoadImage2DD = LoadImage2DDict = LoadImage2Dd
MaskToLabelD = MaskToLabelDict = MaskToLabeld
ScaleIntensity2DD = ScaleIntensity2DDict = ScaleIntensity2Dd
ResizeAspectD = ResizeAspectDict = ResizeAspectd
CropAspectD = CropAspectDict = CropAspectd
SaveMask2DD = SaveMask2DDict = SaveMask2Dd


__all__ = ["aspect_size", "CropAspect", "CropAspectd", "IGNORE_INDEX", "image_array", "LoadImage2D", "LoadImage2Dd",
           "MaskToLabel", "MaskToLabeld", "model_geometry", "preprocessing", "ResizeAspect", "ResizeAspectd",
           "SaveMask2D", "SaveMask2Dd", "ScaleIntensity2D", "ScaleIntensity2Dd", "ToChannels"]
