"""Inference with a trained ``model.pt``: image files in, mask files of the same size out.

A ``model.pt`` written by :func:`medhybrid.checkpoints.save_model` (pretraining or fine-tuning) describes
itself: ``meta["image_channels"]`` says whether the network sees grey or RGB pixels and
``meta["preprocess"]`` how training resized and scaled them. :func:`infer_files` reads each image with
medhybrid's readers (PNG/JPEG/BMP/TIFF, DICOM, NIfTI, MHA/NRRD; :mod:`medhybrid.io`), converts it to
those channels, applies the training preprocessing (:func:`medhybrid.transforms.preprocessing`),
predicts the mask logits at ``sigma_min`` in batches, maps them back to the input's native size
(:func:`medhybrid.evaluate.restore_logits`) and writes

- ``<stem>_mask.png``: uint8, the input's exact height x width; binary models write 0 / 255
  (logit > 0), multi-class models the class index (argmax);
- ``<stem>_mask.nii.gz`` when ``nifti`` is set: the class indices (0/1 for a binary model) as a 2D
  NIfTI that :func:`medhybrid.io.read_image` reads back to the same array (identity affine).

It also holds :class:`Segmenter`, the network whose ``forward`` returns mask logits only, which the MONAI bundles in
``bundles/`` declare as their ``network_def`` (they declare the other steps as MONAI components).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from pydantic import Field

from medhybrid.checkpoints import load_model
from medhybrid.config import Preprocess, StrictModel
from medhybrid.engines import resolve_device
from medhybrid.evaluate import restore_logits
from medhybrid.io import SUPPORTED_SUFFIXES, DataError, atomic_write, file_suffix, image_stem
from medhybrid.networks import EDMPrecond, mask_classes
from medhybrid.transforms import native_then_model

log = logging.getLogger("medhybrid")

MASK_SUFFIX = "_mask"


# --------------------------------------------------------------------------------------------- network
class Segmenter(EDMPrecond):
    """:class:`~medhybrid.networks.EDMPrecond` whose ``forward(x)`` is :meth:`EDMPrecond.segment`: clean
    images (B, C_img, H, W) in [-1, 1] -> mask logits (B, C_mask, H, W), fed at ``sigma_min``.

    Same parameters and state-dict keys as the EDMPrecond, so a ``model.pt`` loads into it unchanged;
    single-input and single-output, as ``monai.bundle`` checks and TorchScript export expect.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return EDMPrecond.forward(self, x, None)[:, self.image_channels :]

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    @classmethod
    def wrap(cls, net: EDMPrecond) -> Segmenter:
        """A Segmenter sharing ``net``'s backbone (and weights)."""
        return cls(net.backbone, net.image_channels, net.mask_channels, net.sigma_data, net.sigma_min, net.noise_embed_scale)


def load_segmenter(model_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Segmenter, dict]:
    """A :class:`Segmenter` with the weights of ``model_path`` (in eval mode on ``device``) and its metadata."""
    net, meta = load_model(model_path)
    return Segmenter.wrap(net).to(resolve_device(str(device))).eval(), meta


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


class _Prepare:
    """The training preprocessing of a model (``meta``), split into loading (to read the native size)
    and the rest (intensity, resize): :func:`medhybrid.transforms.preprocessing`, image only."""

    def __init__(self, meta: dict):
        self.preprocess = Preprocess(**meta.get("preprocess", {}))
        self.load, self.rest = native_then_model(SimpleNamespace(channels=int(meta["image_channels"])), self.preprocess,
                                                 with_label=False)

    def __call__(self, path: Path) -> tuple[torch.Tensor, tuple[int, int]]:
        try:
            d = self.load({"image": str(path)})
            hw = (int(d["image"].shape[1]), int(d["image"].shape[2]))
            x = torch.as_tensor(self.rest(d)["image"]).float()
        except DataError:
            raise
        except Exception as e:  # MONAI wraps a transform's error: report the file with the root cause
            chain = [e]
            while chain[-1].__cause__ is not None:
                chain.append(chain[-1].__cause__)
            named = [c for c in chain if isinstance(c, DataError)]
            if named:
                raise named[0] from e
            raise DataError(path, f"cannot read image ({type(chain[-1]).__name__}: {chain[-1]})") from e
        return x, hw


# --------------------------------------------------------------------------------------------- outputs
def logits_to_mask(logits: torch.Tensor) -> np.ndarray:
    """(K, H, W) logits -> (H, W) uint8 class indices (:func:`medhybrid.networks.mask_classes`)."""
    return mask_classes(logits[None])[0].to(torch.uint8).numpy()


@torch.no_grad()
def segment_files(net: Segmenter, prepare: _Prepare, files: Sequence[Path]) -> list[np.ndarray]:
    """(H, W) uint8 class-index masks of ``files``, each at its file's own size: the model's preprocessing, one batch,
    the logits mapped back to the file's pixel grid before thresholding."""
    loaded = [prepare(Path(f)) for f in files]
    logits = net(torch.stack([t for t, _ in loaded]).to(next(net.parameters()).device)).float().cpu()
    pre = prepare.preprocess
    return [logits_to_mask(restore_logits(lg[None], hw, pre.resolution, pre.aspect)[0])
            for (_, hw), lg in zip(loaded, logits, strict=True)]


def write_mask_png(mask: np.ndarray, path: Path, binary: bool) -> Path:
    with atomic_write(path) as tmp:
        Image.fromarray((mask * 255).astype(np.uint8) if binary else mask.astype(np.uint8), mode="L").save(tmp, format="PNG")
    return path


def write_mask_nifti(mask: np.ndarray, path: Path) -> Path:
    """2D NIfTI holding ``mask`` (H, W) so that :func:`medhybrid.io.read_nifti` returns it unchanged
    (NIfTI's first axis is the column)."""
    img = nib.Nifti1Image(np.ascontiguousarray(mask.T.astype(np.uint8)), affine=np.eye(4))
    img.header.set_xyzt_units("mm")
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return path


# --------------------------------------------------------------------------------------------- API
class InferenceConfig(StrictModel):
    """One inference run (the ``medhybrid infer`` command, the bundle's ``inference`` workflow)."""

    model: Path = Field(description="model.pt from pretraining or fine-tuning")
    input: list[Path] = Field(description="image files and/or folders of images")
    output_dir: Path
    nifti: bool = Field(False, description="also write <stem>_mask.nii.gz")
    batch_size: int = Field(8, ge=1)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")


@torch.no_grad()
def infer_files(model_path: str | os.PathLike, files: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                nifti: bool = False, batch_size: int = 8, device: str | torch.device = "auto") -> list[Path]:
    """Segment ``files`` (image files and/or folders, see :func:`collect_inputs`) with ``model_path``; write
    ``<stem>_mask.png`` (and ``<stem>_mask.nii.gz``) into ``output_dir``. Returns the PNG masks, one per input, in input order.

    Raises :class:`medhybrid.io.DataError` naming the file when an input cannot be read (nothing is
    written for the batch that holds it).
    """
    files = collect_inputs(list(files))
    net, meta = load_segmenter(model_path, device)
    prepare = _Prepare(meta)
    binary = net.mask_channels == 1
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        for f, mask in zip(chunk, segment_files(net, prepare, chunk), strict=True):
            stem = image_stem(f)
            png = write_mask_png(mask, out / f"{stem}{MASK_SUFFIX}.png", binary)
            if nifti:
                write_mask_nifti(mask, out / f"{stem}{MASK_SUFFIX}.nii.gz")
            written.append(png)
        log.info("inference: %d/%d images", start + len(chunk), len(files))
    return written


def infer_folder(model_path: str | os.PathLike, input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                 nifti: bool = False, batch_size: int = 8, device: str | torch.device = "auto") -> list[Path]:
    """:func:`infer_files` on every supported image file in ``input_dir`` (sorted, not recursive)."""
    if not Path(input_dir).is_dir():
        raise DataError(input_dir, "not a folder")
    return infer_files(model_path, [input_dir], output_dir, nifti=nifti, batch_size=batch_size, device=device)


def run_inference(cfg: InferenceConfig) -> list[Path]:
    return infer_files(cfg.model, cfg.input, cfg.output_dir, nifti=cfg.nifti, batch_size=cfg.batch_size, device=cfg.device)
