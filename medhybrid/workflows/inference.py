"""The inference pipeline: image files in, masks of the same size out. One pipeline for ``medhybrid infer``, the
bundles' ``configs/inference.json`` (which declare the same MONAI components), evaluation and MONAI Label's infer task.

1. :func:`inference_preprocessing`: read the file (PNG/JPEG/BMP/TIFF, DICOM, NIfTI, MHA/NRRD; :mod:`medhybrid.data.io`)
   as the model's channels, a large image decoded at reduced size (JPEG draft decoding; DICOM and other formats
   shrunk once while reading: the short side is kept at :data:`REDUCE_FACTOR` x the network's resolution); scale
   intensities as in training; resize to the network's input with MONAI's invertible transforms.
2. The network (:class:`Segmenter`, mask logits at ``sigma_min``) under MONAI's ``SimpleInferer``, run by MONAI's
   ``SupervisedEvaluator`` over an :class:`ImageStream`: image by image, so memory does not grow with the folder, and
   a file that cannot be read is named in one line and skipped.
3. :func:`inference_postprocessing`: MONAI's ``Invertd`` maps the logits back through every step to the file's own
   pixel grid (bilinear), then they are thresholded (binary: logit >= 0; multi-class: argmax) and written by
   :class:`medhybrid.data.transforms.SaveMask2Dd`: ``<stem>_mask.png`` (0/255 for a binary model, class indices
   otherwise), ``<stem>_mask.nii.gz`` on request, a DICOM SEG for a DICOM input.
4. :class:`medhybrid.workflows.quality.QualityReport`: ``quality.csv``, each image's mask area and uncertainty, least certain
   first, for the person who reviews the masks. The uncertainty is scored by the inferer
   (:class:`~medhybrid.workflows.quality.QualityInferer`) on the same clean pass that makes the mask.

A ``model.pt`` written by :func:`medhybrid.networks.checkpoints.save_model` describes itself (``meta["image_channels"]``,
``meta["preprocess"]``), so :func:`infer_files` needs nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer
from monai.transforms import AsDiscreted, Compose, EnsureTyped, Invertd
from pydantic import Field
from torch import nn
from torch.utils.data import IterableDataset

from medhybrid.core.config import StrictModel
from medhybrid.core.devices import resolve_device
from medhybrid.core.progress import Progress
from medhybrid.data.io import SUPPORTED_SUFFIXES, DataError, data_error, file_suffix, image_stem
from medhybrid.data.specs import Preprocess
from medhybrid.data.transforms import LoadImage2Dd, SaveMask2Dd, ScaleIntensity2Dd, model_geometry
from medhybrid.networks.checkpoints import load_model, read_model_file
from medhybrid.networks.nets import EDMPrecond, edm_output
from medhybrid.workflows.quality import QUALITY_CSV, QualityInferer, QualityReport, UncertaintyConfig, score_images

__all__ = ["Segmenter", "load_segmenter", "bundle_segmenter", "collect_inputs", "inference_preprocessing", "inference_postprocessing",
           "ImageStream", "mask_writer", "infer_files", "infer_folder", "InferenceConfig", "InferenceResult",
           "run_inference", "score_files", "REDUCE_FACTOR", "MASK_SUFFIX"]

log = logging.getLogger("medhybrid")

MASK_SUFFIX = "_mask"
REDUCE_FACTOR = 4
"""A large image is decoded at reduced size, its short side kept at least this many times the network's resolution
(256 pixels for a 64-pixel network): no shipped training or test image is reduced, a 12-megapixel photograph is
decoded at an eighth of its size (500 x 375), a 2000-pixel radiograph at a quarter."""


# --------------------------------------------------------------------------------------------- network
class Segmenter(nn.Module):
    """The served network: ``forward(x)`` maps clean images (B, C_img, H, W) in [-1, 1] to mask logits
    (B, C_mask, H, W), fed at ``sigma_min``; single-input and single-output, as ``monai.bundle`` checks and TorchScript
    export expect. It holds the same backbone and settings as :class:`~medhybrid.networks.nets.EDMPrecond` (the same
    state-dict keys, so a ``model.pt`` loads into it unchanged) and the same preconditioning
    (:func:`~medhybrid.networks.nets.edm_output`); :meth:`denoise` gives the whole output at any noise level."""

    def __init__(self, backbone: nn.Module, image_channels: int, mask_channels: int, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, noise_embed_scale: float = 250.0):
        super().__init__()
        self.backbone = backbone
        self.image_channels, self.mask_channels = image_channels, mask_channels
        self.sigma_data, self.sigma_min, self.noise_embed_scale = sigma_data, sigma_min, noise_embed_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return edm_output(self, x, None)[:, self.image_channels :]

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float | None = None, precondition: bool = True) -> torch.Tensor:
        """The whole output (image, then mask channels) at noise level ``sigma``."""
        return edm_output(self, x, sigma, precondition)

    @classmethod
    def wrap(cls, net: EDMPrecond) -> Segmenter:
        """A Segmenter sharing ``net``'s backbone (and weights)."""
        return cls(net.backbone, net.image_channels, net.mask_channels, net.sigma_data, net.sigma_min, net.noise_embed_scale)


def load_segmenter(model_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Segmenter, dict]:
    """A :class:`Segmenter` with the weights of ``model_path`` (in eval mode on ``device``) and its metadata:
    a ``model.pt`` of a pretraining or fine-tuning run, or a MONAI bundle folder (:func:`bundle_segmenter`)."""
    if Path(model_path).is_dir():
        net, meta = bundle_segmenter(model_path)
    else:
        net, meta = load_model(model_path)
        net = Segmenter.wrap(net)
    return net.to(resolve_device(str(device))).eval(), meta


def bundle_segmenter(bundle: str | os.PathLike, weights: str | os.PathLike | None = None) -> tuple[torch.nn.Module, dict]:
    """A medhybrid bundle's ``network_def`` with its ``models/model.pt`` (or ``weights``), and the metadata of a
    ``model.pt`` read from the bundle's ``configs/inference.json`` (``image_channels``, ``resolution``, ``intensity``;
    the bundles pad to square): the same network and preprocessing the bundle runs."""
    root = Path(bundle)
    config = root / "configs" / "inference.json"
    if not config.is_file():
        raise DataError(root, "is a folder without configs/inference.json: pass a model.pt or a medhybrid bundle")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(root)
    path = Path(weights or root / "models" / "model.pt")
    state = read_model_file(path, allow_bare=True)
    net = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(path, f"does not hold the weights of {root.name}'s network ({str(e).splitlines()[0][:200]})") from e
    meta = {"image_channels": int(parser["image_channels"]), "mask_channels": int(net.mask_channels),
            "preprocess": {"resolution": int(parser["resolution"]), "aspect": "pad", "intensity": str(parser["intensity"])}}
    return net, meta


# --------------------------------------------------------------------------------------------- inputs
def collect_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from a folder (every file with a supported suffix, sorted, not recursive), a file, or
    a list of both. Files named explicitly are kept whatever their suffix (reading them reports problems)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                           and file_suffix(f) in SUPPORTED_SUFFIXES)
            skipped = sorted(f.name for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and f not in found)
            if skipped:
                log.info("%s: skipping %d file(s) of unsupported type: %s", p, len(skipped), ", ".join(skipped[:5]))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(p, "file or folder not found")
    if not files:
        raise DataError(None, f"no image files found in {', '.join(map(str, items))} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for f in files:
        stem = image_stem(f)
        if stem in seen and seen[stem].resolve() != f.resolve():
            raise DataError(f, f"has the same name as {seen[stem]}: both would write {stem}{MASK_SUFFIX}.png")
        seen[stem] = f
    return list(dict.fromkeys(files))


# --------------------------------------------------------------------------------------------- the pipeline
def inference_preprocessing(channels: int, preprocess: Preprocess, reduce: bool = True, keys: str = "image") -> Compose:
    """File path -> model-ready image (C, S, S) in [-1, 1], every step invertible by MONAI's ``Invertd``: read
    (reduced-size decoding of large images with ``reduce``), intensity as in training, resize
    (:func:`medhybrid.data.transforms.model_geometry`). The bundles' ``preprocessing`` declares the same steps."""
    size = preprocess.resolution
    return Compose([LoadImage2Dd(keys, channels=channels, reduce_to=REDUCE_FACTOR * size if reduce else None),
                    ScaleIntensity2Dd(keys, preprocess.intensity, *preprocess.percentiles),
                    *model_geometry(keys, size, preprocess.aspect),
                    EnsureTyped(keys, dtype=torch.float32)])


def inference_postprocessing(preprocessing: Compose, mask_channels: int, writer: Callable | None = None,
                             pred_key: str = "pred", image_key: str = "image") -> Compose:
    """Logits (K, S, S) -> the file's class map (1, H, W) uint8: ``Invertd`` through ``preprocessing`` (bilinear, to
    the file's own size), then the threshold (one channel: logit >= 0, i.e. probability >= 0.5) or the argmax
    (several), then ``writer`` (:func:`mask_writer`) when given."""
    steps: list = [Invertd(pred_key, transform=preprocessing, orig_keys=image_key, nearest_interp=False, to_tensor=True),
                   AsDiscreted(pred_key, threshold=0.0, dtype=torch.uint8) if mask_channels == 1
                   else AsDiscreted(pred_key, argmax=True, dtype=torch.uint8)]
    return Compose(steps + ([writer] if writer is not None else []))


def mask_writer(output_dir: str | os.PathLike, mask_channels: int, nifti: bool = False, dicom_seg: bool = True,
                labels: dict[str, int] | None = None, pred_key: str = "pred") -> SaveMask2Dd:
    """The one mask writer: ``<stem>_mask.png`` (0/255 for a one-channel model, class indices otherwise), with
    ``nifti`` ``<stem>_mask.nii.gz``, with ``dicom_seg`` a DICOM SEG beside a DICOM input's mask."""
    return SaveMask2Dd(pred_key, output_dir=str(output_dir), postfix=MASK_SUFFIX, binary_png=mask_channels == 1,
                       nifti=nifti, dicom_seg=dicom_seg, labels=labels)


class ImageStream(IterableDataset):
    """The items of ``data`` (``{"image": path}`` ...) through ``transform``, one at a time; an item that fails is
    logged in one line naming the file and the reason, kept in :attr:`failures` and skipped, so a batch of good
    images is never lost to one bad file. :meth:`finish` ends a run with a summary line (and exit status 1 when a
    file was skipped)."""

    def __init__(self, data: Sequence[dict], transform: Callable, key: str = "image", progress: bool = True,
                 desc: str = "inference"):
        self.data, self.transform, self.key = list(data), transform, key
        self.progress, self.desc = progress, desc
        self.failures: list[tuple[str, str]] = []
        self.done = 0

    def __iter__(self):
        """Each item once it is read; an item counts as done (:class:`~medhybrid.core.progress.Progress`: a bar on a
        terminal, a log line every few images or 30 s otherwise) when the next one is asked for, after the network and
        the writer have had it."""
        self.failures, self.done = [], 0
        progress = Progress(len(self.data), self.desc, enabled=self.progress)
        try:
            for item in self.data:
                try:
                    out = self.transform(dict(item))
                except Exception as e:  # MONAI wraps a reader's error: report the cause, never a traceback
                    found = data_error(e)
                    reason = found.problem if found is not None else f"cannot be read ({type(e).__name__}: {e})"
                    self.failures.append((str(item.get(self.key)), reason))
                    log.error("skipped %s: %s", item.get(self.key), reason)
                    progress.update()
                    continue
                self.done += 1
                yield out
                progress.update()
        finally:
            progress.close()

    def summary(self) -> str:
        n = len(self.data)
        line = f"inference: {self.done} of {n} image(s) segmented"
        return line + (f", {len(self.failures)} could not be read (named above)" if self.failures else "")

    def finish(self) -> None:
        """Log :meth:`summary`; raise ``SystemExit(1)`` (no traceback) when any file was skipped."""
        log.info(self.summary())
        if self.failures:
            raise SystemExit(1)


@dataclass
class InferenceResult:
    written: list[Path] = field(default_factory=list)
    """The PNG masks, in input order of the files that could be read."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of every file that could not be read."""
    quality_csv: Path | None = None
    summary: str = ""


@torch.no_grad()
def infer_files(model_path: str | os.PathLike, files: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                nifti: bool = False, batch_size: int = 1, device: str | torch.device = "auto", dicom_seg: bool = True,
                uncertainty: UncertaintyConfig | None = None, reduce: bool = True, quality: bool = True) -> InferenceResult:
    """Segment ``files`` (image files and/or folders, :func:`collect_inputs`) with ``model_path`` through the
    pipeline above; write the masks and ``quality.csv`` into ``output_dir``. A file that cannot be read is skipped
    and reported (:attr:`InferenceResult.failures`); a model file that is not a model raises
    :class:`~medhybrid.data.io.DataError` before any image is read. ``reduce=False`` decodes every pixel of large images
    (see :data:`REDUCE_FACTOR`). ``quality=False`` skips ``quality.csv`` (its uncertainty score runs the network
    3 more times per image)."""
    files = collect_inputs(list(files))
    net, meta = load_segmenter(model_path, device)
    pre = inference_preprocessing(int(meta["image_channels"]), Preprocess(**meta.get("preprocess", {})), reduce)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = mask_writer(out, net.mask_channels, nifti=nifti, dicom_seg=dicom_seg)
    stream = ImageStream([{"image": str(f)} for f in files], pre)
    report = QualityReport(out, uncertainty, stream=stream) if quality else None
    dev = next(net.parameters()).device
    evaluator = SupervisedEvaluator(device=dev, val_data_loader=DataLoader(stream, batch_size=batch_size, num_workers=0),
                                    network=net, inferer=QualityInferer(uncertainty) if quality else SimpleInferer(),
                                    postprocessing=inference_postprocessing(pre, net.mask_channels, writer),
                                    val_handlers=[report] if report else [], amp=False)
    evaluator.run()
    by_source = {Path(w).name: Path(w) for w in writer.saver.written if str(w).endswith(".png")}
    written = [by_source[n] for f in files if (n := f"{image_stem(f)}{MASK_SUFFIX}.png") in by_source]
    result = InferenceResult(written, list(stream.failures), out / QUALITY_CSV if quality else None, stream.summary())
    log.info(result.summary)
    return result


def infer_folder(model_path: str | os.PathLike, input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                 nifti: bool = False, batch_size: int = 1, device: str | torch.device = "auto") -> InferenceResult:
    """:func:`infer_files` on every supported image file in ``input_dir`` (sorted, not recursive)."""
    if not Path(input_dir).is_dir():
        raise DataError(input_dir, "not a folder")
    return infer_files(model_path, [input_dir], output_dir, nifti=nifti, batch_size=batch_size, device=device)


def score_files(net: EDMPrecond, meta: dict, files: Sequence[str | os.PathLike],
                cfg: UncertaintyConfig | None = None) -> list[float]:
    """Uncertainty u (:mod:`medhybrid.workflows.quality`) of image files under the model's own preprocessing (``meta`` of its
    model.pt); raises :class:`~medhybrid.data.io.DataError` naming a file that cannot be read."""
    pre = inference_preprocessing(int(meta["image_channels"]), Preprocess(**meta.get("preprocess", {})))
    images = []
    for f in files:
        try:
            images.append(pre({"image": str(f)})["image"])
        except Exception as e:
            found = data_error(e)
            if found is None:
                raise
            raise found from e
    return score_images(net, images, cfg)


# --------------------------------------------------------------------------------------------- API
class InferenceConfig(StrictModel):
    """One inference run (the ``medhybrid infer`` command)."""

    model: Path = Field(description="model.pt from pretraining or fine-tuning")
    input: list[Path] = Field(description="image files and/or folders of images")
    output_dir: Path
    nifti: bool = Field(False, description="also write <stem>_mask.nii.gz")
    dicom_seg: bool = Field(True, description="a DICOM SEG beside the mask of a DICOM input")
    batch_size: int = Field(1, ge=1, description="images per network call (1: memory stays that of one image)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")


def run_inference(cfg: InferenceConfig) -> InferenceResult:
    return infer_files(cfg.model, cfg.input, cfg.output_dir, nifti=cfg.nifti, batch_size=cfg.batch_size,
                       device=cfg.device, dicom_seg=cfg.dicom_seg)
