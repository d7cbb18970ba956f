"""Typed configuration: pydantic models loaded from layered YAML with command-line overrides.

A YAML file may name one or more ``base:`` files (relative to itself) that it overrides key by key.
Strings may use ``${ENV_VAR:default}``. Overrides are ``dotted.key=value`` with the value parsed as
YAML (``pretrain.lr=3e-4``, ``model.channels=[32,64]``, ``pretrain.dataset=ph2``). Every model
forbids unknown keys, so a wrong key, type or path fails at load time with a message naming it.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ValidationError,
)

from medhybrid.core.files import atomic_write

PACKAGED_CONFIGS = Path(__file__).parents[1] / "configs"
"""The configs shipped with the package: in a clone a link to the repository's top-level ``configs/``, in an
installed wheel the copy packaged with it."""

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


def _positive_levels(v: tuple[float, ...]) -> tuple[float, ...]:
    if not v or any(s <= 0 for s in v):
        raise ValueError(f"sigmas must be a non-empty list of positive noise levels, got {list(v)}")
    return v


NoiseLevels = Annotated[tuple[float, ...], AfterValidator(_positive_levels)]
"""A config field holding EDM noise levels (sigma): non-empty, all positive."""


# --------------------------------------------------------------------------------------------- preprocessing


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


