"""Unlabelled images for pretraining: image-only sources, their on-disk cache, and the batches that mix them with
the labelled source.

An unlabelled source is a dataset used without its masks: an image-only dataset (a folder searched recursively,
DICOM with or without a suffix, or a CSV with an ``image`` column) or named splits of a labelled dataset (a target's
``pool``; never its ``test`` split). The denoising (``hybrid``, ``diffusion``) and masked-patch (``mdm``) objectives
apply to every image; the mask loss only to labelled ones: an unlabelled sample carries ``labelled = 0`` and a label
of ignored pixels, and the prepare-batch seam (:class:`medhybrid.engines.batches.CorruptionPrepareBatch`) gives it a mask
weight of exactly zero.

Sets larger than memory are cached on disk as preprocessed arrays (MONAI's ``PersistentDataset``): each file is
decoded once, ever, and training reads the small arrays back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.utils import convert_to_tensor
from pydantic import BeforeValidator, Field, field_validator, model_validator

from medhybrid.core.config import StrictModel, dump_config
from medhybrid.data.check import require_valid
from medhybrid.data.datasets import load_pairs
from medhybrid.data.io import DataError
from medhybrid.data.specs import DatasetRef, Preprocess
from medhybrid.data.transforms import IGNORE_INDEX, preprocessing

log = logging.getLogger("medhybrid")

HELD_OUT_SPLITS = ("test",)
"""Splits whose images never enter pretraining, not even without their masks."""


def _source_from_ref(v: Any) -> Any:
    return {"dataset": v} if isinstance(v, (str, os.PathLike)) else v


class UnlabelledSource(StrictModel):
    """Images used without masks: an image-only dataset, or ``splits`` of a labelled dataset."""

    dataset: DatasetRef
    splits: list[str] | None = Field(None, description="splits whose images to use; None: every image of an image-only "
                                     "dataset (a labelled dataset must name them, e.g. [pool])")
    max_images: int | None = Field(None, ge=1, description="use the first N images (sorted by id) of the source")

    @model_validator(mode="after")
    def _splits(self):
        if self.dataset.labelled and self.splits is None:
            raise ValueError(f"dataset {self.dataset.name!r} has masks: name the splits whose images pretraining may use "
                             f"(e.g. splits: [pool]); its masks are never read")
        held = sorted(set(self.splits or ()) & set(HELD_OUT_SPLITS))
        if held:
            raise ValueError(f"split(s) {held} of dataset {self.dataset.name!r} are held out for testing: their images "
                             "are never used for training, not even without their masks")
        return self

    @property
    def name(self) -> str:
        return self.dataset.name + (f":{'+'.join(self.splits)}" if self.splits else "")


class UnlabelledConfig(StrictModel):
    """Unlabelled images mixed into pretraining batches beside the labelled source."""

    sources: list[Annotated[UnlabelledSource, BeforeValidator(_source_from_ref)]] = Field(
        default_factory=list, description="image-only datasets (a folder, a CSV of images) or {dataset, splits}")
    share: float = Field(0.5, gt=0, le=1, description="share of each batch drawn from the unlabelled images (1 when "
                         "there is no labelled dataset)")
    beside: bool = Field(False, description="false: the unlabelled images take `share` of a batch of train.batch_size, "
                         "so each batch holds fewer labelled images than a run without them; true: they come beside a full "
                         "labelled batch of train.batch_size (the batch grows to batch_size / (1 - share)), so the run sees "
                         "as many labelled images as one without them")
    cache: Literal["auto", "memory", "disk"] = Field(
        "auto", description="memory: decode every image into RAM once; disk: preprocessed arrays cached under cache_dir "
        "(sets larger than memory); auto: memory up to memory_limit_mb of arrays, else disk")
    cache_dir: Path | None = Field(None, description="disk cache root (None: runs/cache); one subfolder per preprocessing")
    memory_limit_mb: float = Field(2048, gt=0, description="auto: the largest set of preprocessed arrays kept in RAM")

    @field_validator("sources")
    @classmethod
    def _unique(cls, v: list[UnlabelledSource]) -> list[UnlabelledSource]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"unlabelled source(s) {dup} listed twice")
        return v


EXECUTION_ONLY = ("cache", "cache_dir", "memory_limit_mb")
"""Fields of :class:`UnlabelledConfig` that decide how images are held, not what is computed."""


def source_items(src: UnlabelledSource) -> list[dict]:
    """``{"image", "stamp"}`` items of ``src`` (never a mask): ``stamp`` (size and modification time) makes a changed
    file miss the disk cache. Raises :class:`~medhybrid.data.io.DataError` for a dataset with problems or no images."""
    items = sorted(load_pairs(src.dataset, src.splits), key=lambda p: p["id"])[: src.max_images or None]
    if not items:
        raise DataError(src.dataset.root, f"unlabelled source {src.name!r} has no images"
                        + (f" in split(s) {src.splits}" if src.splits else ""))
    out = []
    for p in items:
        st = os.stat(p["image"]) if os.path.exists(p["image"]) else None
        out.append({"image": p["image"], "stamp": f"{st.st_size}-{st.st_mtime_ns}" if st else "missing"})
    return out


def check_sources(cfg: UnlabelledConfig) -> None:
    """Open every unlabelled image as training will (readable, 2D, grey or RGB); raise naming every bad file."""
    for src in cfg.sources:
        require_valid(src.dataset, splits=src.splits, images_only=True)


def unlabelled_dataset(cfg: UnlabelledConfig, channels: int, preprocess: Preprocess) -> Dataset:
    """Every image of ``cfg.sources`` as ``{"image"}`` (channel-first, ``channels``, in [-1, 1], square), held as
    ``cfg.cache`` says. The disk cache lives in ``<cache_dir>/<hash of channels and preprocessing>/``."""
    items = [it for src in cfg.sources for it in source_items(src)]
    spec = cfg.sources[0].dataset.model_copy(update={"channels": channels})
    transform = preprocessing(spec, preprocess, with_label=False)
    nbytes = len(items) * channels * preprocess.resolution**2 * 4
    mode = cfg.cache if cfg.cache != "auto" else ("memory" if nbytes <= cfg.memory_limit_mb * 2**20 else "disk")
    log.info("unlabelled images: %d from %s, held in %s (%.0f MB of arrays)", len(items),
             ", ".join(s.name for s in cfg.sources), mode, nbytes / 2**20)
    if mode == "memory":
        return CacheDataset(items, transform=transform, num_workers=min(4, os.cpu_count() or 1), progress=False,
                            copy_cache=False)
    return PersistentDataset(items, transform=transform, cache_dir=disk_cache_dir(cfg, channels, preprocess))


def disk_cache_dir(cfg: UnlabelledConfig, channels: int, preprocess: Preprocess) -> Path:
    key = json.dumps({"channels": channels, "preprocess": dump_config(preprocess)}, sort_keys=True)
    return Path(cfg.cache_dir or Path("runs") / "cache") / ("unlabelled-" + hashlib.sha256(key.encode()).hexdigest()[:12])


class MixedDataset(torch.utils.data.Dataset):
    """Labelled items (indices ``0..len(labelled)-1``) followed by unlabelled ones, as plain tensors
    ``{"image", "label", "labelled"}``: an unlabelled item's label is all :data:`IGNORE_INDEX` and ``labelled`` is 0,
    so a batch collates whatever mixes it and the mask loss can never see one of its pixels. ``views`` name further
    image keys an unlabelled item carries (a strongly augmented view, :mod:`medhybrid.engines.semi`): a labelled item gets
    its image under each of them, so every item has the same keys."""

    def __init__(self, labelled, unlabelled, views: tuple[str, ...] = ()):
        self.labelled, self.unlabelled, self.views = labelled, unlabelled, tuple(views)

    def __len__(self) -> int:
        return len(self.labelled) + len(self.unlabelled)

    def __getitem__(self, i: int) -> dict:
        n = len(self.labelled)
        if i < n:
            d = self.labelled[i]
            image = convert_to_tensor(d["image"])
            return {"image": image, "label": convert_to_tensor(d["label"]), "labelled": torch.tensor(1.0),
                    **{v: image for v in self.views}}
        d = self.unlabelled[i - n]
        image = convert_to_tensor(d["image"])
        return {"image": image, "label": torch.full((1, *image.shape[1:]), IGNORE_INDEX), "labelled": torch.tensor(0.0),
                **{v: convert_to_tensor(d[v]) for v in self.views}}


def batch_split(batch_size: int, share: float) -> tuple[int, int]:
    """(labelled, unlabelled) samples per batch for an unlabelled ``share``; each at least 1 when 0 < share < 1."""
    k = int(round(share * batch_size))
    if 0 < share < 1:
        k = min(max(k, 1), batch_size - 1)
    return batch_size - k, k


def mixed_batch(batch_size: int, share: float, beside: bool) -> tuple[int, int]:
    """(labelled, unlabelled) samples per batch: the unlabelled ``share`` of ``batch_size`` (:func:`batch_split`), or,
    ``beside``, ``batch_size`` labelled ones and as many unlabelled ones as make them ``share`` of the grown batch."""
    if not beside or share >= 1:
        return batch_split(batch_size, share)
    return batch_size, max(1, int(round(batch_size * share / (1 - share))))


__all__ = ["batch_split", "mixed_batch", "check_sources", "disk_cache_dir", "EXECUTION_ONLY", "HELD_OUT_SPLITS", "MixedDataset",
           "source_items", "unlabelled_dataset", "UnlabelledConfig", "UnlabelledSource"]
