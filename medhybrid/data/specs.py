"""What a dataset is (:class:`DatasetSpec`: where its images and masks are, how mask values become classes, its
splits) and how its images become network input (:class:`Preprocess`), as typed, validated configuration."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medhybrid.core.config import (
    ConfigError,
    StrictModel,
    apply_overrides,
    find_config,
    read_yaml,
    validate,
)
from medhybrid.data.datasets import discover_pairs
from medhybrid.data.io import file_channels, read_image

DATA_ROOT_ENV = "MEDHYBRID_DATA_ROOT"


class MaskSpec(StrictModel):
    """How raw mask values become class indices."""

    values: dict[int, int] = Field(default_factory=lambda: {0: 0, 255: 1},
                                   description="raw value -> class index; other values are errors")
    ignore: list[int] = Field(default_factory=list, description="raw values marking regions excluded from losses and metrics")
    threshold: float | None = Field(None, description="anti-aliased binary masks: raw >= threshold is foreground")

    @property
    def num_classes(self) -> int:
        return 2 if self.threshold is not None else max(self.values.values()) + 1

    @model_validator(mode="after")
    def _check(self):
        if self.threshold is None:
            classes = sorted(set(self.values.values()))
            if not classes or classes[0] != 0 or classes != list(range(len(classes))):
                raise ValueError(f"mask.values must map onto classes 0..K-1 with 0 = background, got {self.values}")
        overlap = set(self.ignore) & set(self.values) if self.threshold is None else set()
        if overlap:
            raise ValueError(f"mask values {sorted(overlap)} are both a class and ignored")
        return self


class DatasetSpec(StrictModel):
    """A dataset of 2D images, with masks or image-only (``masks: null``).

    Pairs come from a folder (``images/<id>.<ext>`` with ``masks/<id><mask_suffix><mask_ext>``) or from
    a ``datalist``: a CSV with ``image,mask[,split]`` columns or a MONAI decathlon-style JSON. Splits
    come from ``split`` (JSON ``{split name: [ids]}``, used when the file exists or no datalist gives
    splits), the CSV's ``split`` column or the JSON's keys. An image-only dataset (``masks: null``) takes
    every image file under ``images`` (searched recursively; DICOM files are recognised without a suffix),
    or a datalist's ``image`` column, and needs no splits.
    Relative paths are relative to ``root``; a relative ``root`` is relative to the YAML that holds it.
    """

    name: str
    role: Literal["source", "target"] = "source"
    description: str = ""
    root: Path
    images: str = "images"
    masks: str | None = Field("masks", description="masks folder; null: an image-only dataset (unlabelled images)")
    mask_suffix: str = ""
    mask_ext: str = ".png"
    datalist: str | None = None
    split: str | None = "split.json"
    channels: Literal[1, 3] = Field(description="1 = grey, 3 = RGB; files are converted to this")
    mask: MaskSpec = Field(default_factory=MaskSpec)
    required_splits: tuple[str, ...] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="splits that must be present; None: train and val for a source, pool and test for a target (a "
        "training-only target, such as the labels a clinician saved in MONAI Label, sets [pool])")

    @field_validator("root", mode="before")
    @classmethod
    def _resolve_root(cls, v: Any, info: ValidationInfo) -> Any:
        base = (info.context or {}).get("base_dir")
        if base is not None and isinstance(v, (str, Path)) and not Path(v).is_absolute():
            v = Path(base) / v
        return v

    @field_validator("root")
    @classmethod
    def _root_exists(cls, v: Path) -> Path:
        v = Path(os.path.normpath(v))
        if not v.is_dir():
            raise ValueError(f"dataset root {v} does not exist or is not a folder")
        return v

    @property
    def labelled(self) -> bool:
        """Whether the dataset has masks (an image-only dataset is for pretraining's unlabelled images)."""
        return self.masks is not None

    @property
    def splits(self) -> tuple[str, ...]:
        if self.required_splits is not None:
            return self.required_splits
        if not self.labelled:
            return ()
        return ("train", "val") if self.role == "source" else ("pool", "test")


def load_dataset_spec(ref: str | os.PathLike | dict | DatasetSpec, overrides: list[str] | None = None,
                      base_dir: str | os.PathLike | None = None) -> DatasetSpec:
    """A :class:`DatasetSpec` from a shipped name (``ph2``), a dataset YAML, a mapping, or built from a
    folder with ``images/`` and ``masks/``, a CSV datalist or a decathlon-style JSON datalist.

    A folder without ``images/`` and ``masks/`` subfolders is an image-only dataset of every image file
    under it; a CSV without a ``mask`` (or ``label``) column is an image-only datalist. ``channels``, when
    neither the spec nor ``overrides`` give it, is read from the files' headers (grey or RGB); files that
    disagree raise :class:`ConfigError` asking for ``channels=1`` or ``channels=3``. ``overrides``
    (``key=value``) complete or change the spec, e.g. ``mask.threshold=128``.
    """
    if isinstance(ref, DatasetSpec) and not overrides:
        return ref
    if isinstance(ref, DatasetSpec):
        ref = ref.model_dump()
    source, ctx_dir, yaml_path = "dataset", base_dir, None
    if isinstance(ref, dict):
        data = ref
    else:
        p = Path(ref)
        if base_dir is not None and not p.is_absolute() and (Path(base_dir) / p).exists():
            p = Path(base_dir) / p
        if p.is_dir():
            data, source, ctx_dir = {"name": p.resolve().name, "root": str(p.resolve())}, str(p), None
            if not ((p / "images").is_dir() and (p / "masks").is_dir()):
                data.update(images=".", masks=None)  # a folder of images: image-only, searched recursively
        elif p.is_file() and (p.suffix.lower() == ".csv" or (p.suffix.lower() == ".json" and _is_datalist(p))):
            data = {"name": p.stem, "root": str(p.resolve().parent), "datalist": p.name, "split": None}
            if p.suffix.lower() == ".csv" and not {"mask", "label"} & set(_csv_columns(p)):
                data["masks"] = None
            source, ctx_dir = str(p), None
        else:
            yaml_path = find_config(p, "data")
            data, source, ctx_dir = read_yaml(yaml_path), str(yaml_path), yaml_path.parent
    data = apply_overrides(data, overrides or [])
    if "channels" not in data and (channels := _infer_channels(data, source, ctx_dir)) is not None:
        data["channels"] = channels
    try:
        return validate(DatasetSpec, data, source=source, context={"base_dir": ctx_dir})
    except ConfigError as e:
        hint = _data_root_hint(yaml_path, overrides or []) if "dataset root" in str(e) else None
        if hint:
            raise ConfigError(f"{e}\n  {hint}") from None
        raise


def _data_root_hint(yaml_path: Path | None, overrides: list[str]) -> str | None:
    """What to do when a dataset YAML's ``root: ${MEDHYBRID_DATA_ROOT:default}/...`` names no folder: the default is
    relative to the YAML, right in a clone beside ``../shared/data`` and wrong once the YAML is installed with the
    package."""
    if yaml_path is None or any(o.split("=", 1)[0].strip() == "root" for o in overrides):
        return None
    try:
        raw = (yaml.safe_load(yaml_path.read_text()) or {}).get("root")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(raw, str) or f"${{{DATA_ROOT_ENV}" not in raw:
        return None
    if os.environ.get(DATA_ROOT_ENV):
        return (f"{DATA_ROOT_ENV}={os.environ[DATA_ROOT_ENV]} does not hold this dataset (root: {raw}): set it to the "
                "folder that does, or pass your own dataset YAML or folder")
    return (f"{DATA_ROOT_ENV} is not set, so root ({raw}) fell back to its default, relative to {yaml_path.parent}: "
            f"set {DATA_ROOT_ENV} to the folder holding the datasets (e.g. {DATA_ROOT_ENV}=/data with "
            "/data/dermoscopy/ph2), or pass your own dataset YAML or folder")


def _csv_columns(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return [c.strip() for c in next(csv.reader(fh), [])]


def _infer_channels(data: dict, source: str, base_dir) -> int | None:
    """The channel count the dataset's image files agree on (1 grey, 3 RGB), read from their headers; None when no
    file could be read (validation then asks for ``channels``). Raises :class:`ConfigError` when they disagree."""
    try:  # any channel count validates the rest of the spec; the files are what decides it
        spec = validate(DatasetSpec, {**data, "channels": 1}, source=source, context={"base_dir": base_dir})
    except ConfigError:
        return None
    found: dict[int, list[str]] = {}
    items, problems = discover_pairs(spec)
    for item in items:
        c = file_channels(item["image"])
        if c is not None:
            found.setdefault(c, []).append(item["image"])
    if not found:
        unreadable = []
        for item in items[:5]:
            try:
                read_image(item["image"])
            except Exception as e:  # the reason the file cannot be read, naming it
                unreadable.append(str(e))
        why = [str(p) for p in problems] or unreadable
        raise ConfigError(f"{source}: no readable image to tell grey from RGB" + ("".join(f"\n  {w}" for w in why[:5])))
    if len(found) > 1:
        parts = "; ".join(f"{len(v)} {'grey' if c == 1 else 'RGB'} (e.g. {v[0]})" for c, v in sorted(found.items()))
        raise ConfigError(f"{source}: the image files disagree on grey or RGB ({parts}); say which the model should "
                          "see with channels=1 or channels=3 (medhybrid data check: --set channels=N); files are converted to it")
    return next(iter(found), None)


def _dataset_from_ref(v: Any, info: ValidationInfo) -> Any:
    """Before-validator: a dataset given by name or path becomes its :class:`DatasetSpec` (a relative path is
    looked up beside the config that names it)."""
    if isinstance(v, (str, os.PathLike)):
        return load_dataset_spec(v, base_dir=(info.context or {}).get("base_dir"))
    return v


DatasetRef = Annotated[DatasetSpec, BeforeValidator(_dataset_from_ref)]
"""A config field holding a dataset: a shipped name (``ph2``), a dataset YAML, a folder, a datalist or a mapping."""


def _is_datalist(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and any(isinstance(v, list) and v and isinstance(v[0], dict) for v in data.values())


class Preprocess(StrictModel):
    """How images become network input."""

    resolution: int = Field(64, ge=8, description="square side in pixels")
    aspect: Literal["stretch", "pad", "crop"] = Field("pad", description="stretch to square, pad, or centre-crop")
    intensity: Literal["fixed", "minmax", "percentile"] = "fixed"
    percentiles: tuple[float, float] = (0.5, 99.5)

    @field_validator("resolution")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the U-Net downsamples by 8), got {v}")
        return v

