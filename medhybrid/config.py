"""Typed configuration: pydantic models loaded from layered YAML with command-line overrides.

A YAML file may name one or more ``base:`` files (relative to itself) that it overrides key by key.
Strings may use ``${ENV_VAR:default}``. Overrides are ``dotted.key=value`` with the value parsed as
YAML (``pretrain.lr=3e-4``, ``model.channels=[32,64]``, ``pretrain.dataset=ph2``). Every model
forbids unknown keys, so a wrong key, type or path fails at load time with a message naming it.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medhybrid.datasets import discover_pairs
from medhybrid.io import atomic_write, file_channels, read_image

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
"""The configs shipped with the package: in a clone a link to the repository's top-level ``configs/``, in an
installed wheel the copy packaged with it."""

DATA_ROOT_ENV = "MEDHYBRID_DATA_ROOT"
CONFIG_DIR_ENV = "MEDHYBRID_CONFIG_DIR"


class ConfigError(ValueError):
    """A configuration problem, with the file and key it comes from."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------------------------- YAML helpers
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


def expand_env(value: Any) -> Any:
    """Expand ``${NAME}`` and ``${NAME:default}`` in every string of a nested structure."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) in os.environ:
                return os.environ[m.group(1)]
            if m.group(2) is None:
                raise ConfigError(f"environment variable {m.group(1)} is not set and has no default")
            return m.group(2)
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, following ``base:`` files (relative to the file), expanding ``${ENV}``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_yaml((path.parent / b).resolve()))
    return deep_merge(merged, expand_env(data))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = expand_env(value)
    return out


def config_dir() -> Path:
    """Folder of the shipped configs (``data/``, ``pretrain/``, ``finetune/``, ``ablation/``): ``$MEDHYBRID_CONFIG_DIR``,
    else the ones packaged with medhybrid (:data:`PACKAGED_CONFIGS`). Symbolic links are resolved, so a YAML's relative
    paths (``base:`` files, a dataset's default ``root``) are relative to where the file really is."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env).expanduser().resolve() if env else PACKAGED_CONFIGS.resolve()


def find_config(name: str | os.PathLike, kind: str) -> Path:
    """A config path, or the name of a shipped one (``configs/<kind>/<name>.yaml``)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        return p.resolve()
    folder = config_dir() / kind
    shipped = folder / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    if not folder.is_dir():
        where = (f"{CONFIG_DIR_ENV}={os.environ[CONFIG_DIR_ENV]} has no {kind}/ folder" if os.environ.get(CONFIG_DIR_ENV)
                 else f"no shipped configs found ({folder} is missing: this medhybrid was installed without its configs)")
        raise ConfigError(f"{kind} config {str(name)!r}: not a file, and {where}; pass a YAML file's path instead, or set "
                          f"{CONFIG_DIR_ENV} to a folder holding {kind}/{name}.yaml")
    known = sorted(q.stem for q in folder.glob("*.yaml"))
    raise ConfigError(f"unknown {kind} config {str(name)!r}: not a file, and not one of {known} in {folder}; "
                      "pass a YAML file's path instead")


# --------------------------------------------------------------------------------------------- data
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


def _positive_levels(v: tuple[float, ...]) -> tuple[float, ...]:
    if not v or any(s <= 0 for s in v):
        raise ValueError(f"sigmas must be a non-empty list of positive noise levels, got {list(v)}")
    return v


NoiseLevels = Annotated[tuple[float, ...], AfterValidator(_positive_levels)]
"""A config field holding EDM noise levels (sigma): non-empty, all positive."""


# --------------------------------------------------------------------------------------------- preprocessing
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


# --------------------------------------------------------------------------------------------- loading
M = TypeVar("M", bound=BaseModel)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def validate(model: type[M], data: dict, source: str = "config", context: dict | None = None) -> M:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(model: type[M], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                kind: str | None = None) -> M:
    """Load ``path`` (or the shipped config named so under ``configs/<kind>/``) with ``overrides``."""
    data: dict = {}
    base_dir = Path.cwd()
    source = "config"
    if path is not None:
        p = find_config(path, kind) if kind else Path(path)
        data = read_yaml(p)
        base_dir, source = p.parent, str(p)
    data = apply_overrides(data, overrides or [])
    return validate(model, data, source=source, context={"base_dir": base_dir})


def dump_config(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
    return Path(path)


__all__ = ["apply_overrides", "config_dir", "CONFIG_DIR_ENV", "ConfigError", "DATA_ROOT_ENV", "DatasetSpec",
           "deep_merge", "dump_config", "expand_env", "find_config", "format_validation_error", "load_config",
           "load_dataset_spec", "M", "MaskSpec", "PACKAGED_CONFIGS", "parse_override", "Preprocess", "read_yaml",
           "save_config", "StrictModel", "validate"]
