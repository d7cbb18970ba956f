"""Image/mask pairs, splits and few-shot subsets of a :class:`~medhybrid.data.specs.DatasetSpec`.

A *pair* is a dict ``{"id", "image", "label", "split"}`` with absolute paths: a MONAI datalist item. An
image-only dataset (``masks: null``) yields items without ``label``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medhybrid.data.io import SUPPORTED_SUFFIXES, DataError, file_suffix, reader_for

if TYPE_CHECKING:  # annotations only: config builds on this module (channel inference), never the reverse
    from medhybrid.data.specs import DatasetSpec

DECATHLON_SPLITS = {"training": "train", "validation": "val", "test": "test"}


def _stem(path: str | Path) -> str:
    name = Path(path).name
    suffix = file_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def _folder_images(spec: DatasetSpec, problems: list[DataError], skipped: list[str]) -> list[dict]:
    """Every image file under ``root/images``, recursively (hidden files and folders left out), DICOM files
    recognised by their content whatever their name; other files go to ``skipped``. Ids are the paths relative to
    that folder, without a known image suffix."""
    img_dir = spec.root / spec.images
    if not img_dir.is_dir():
        problems.append(DataError(img_dir, "images folder not found"))
        return []
    items = []
    for f in sorted(img_dir.rglob("*")):
        rel = f.relative_to(img_dir)
        if not f.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if reader_for(f) is None:
            skipped.append(str(f))
            continue
        sid = rel.as_posix()
        if file_suffix(f) in SUPPORTED_SUFFIXES:
            sid = sid[: len(sid) - len(file_suffix(f))]
        items.append({"id": sid, "image": str(f)})
    if not items:
        shown = ", ".join(Path(p).name for p in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        problems.append(DataError(img_dir, "no image files found" + (
            f": {len(skipped)} file(s) that are neither a supported image type nor DICOM ({shown})" if skipped
            else " (the folder is empty)")))
    return items


def _folder_pairs(spec: DatasetSpec, problems: list[DataError]) -> list[dict]:
    img_dir, mask_dir = spec.root / spec.images, spec.root / spec.masks
    if not img_dir.is_dir():
        problems.append(DataError(img_dir, "images folder not found"))
        return []
    if not mask_dir.is_dir():
        problems.append(DataError(mask_dir, "masks folder not found"))
        return []
    pairs = []
    for f in sorted(img_dir.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        if file_suffix(f) not in SUPPORTED_SUFFIXES:
            problems.append(DataError(f, f"unsupported file type {file_suffix(f)!r} in the images folder"))
            continue
        sid = _stem(f)
        pairs.append({"id": sid, "image": str(f), "label": str(mask_dir / f"{sid}{spec.mask_suffix}{spec.mask_ext}")})
    return pairs


def _csv_pairs(path: Path, root: Path, labelled: bool = True) -> list[dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return []
    cols = set(rows[0])
    label_col = "mask" if "mask" in cols else "label" if "label" in cols else None
    if "image" not in cols or (labelled and label_col is None):
        raise DataError(path, f"CSV datalist needs columns 'image' and 'mask' (or 'label'), has {sorted(cols)}"
                        + ("; an image-only dataset needs only 'image' (set masks: null)" if "image" in cols else ""))
    pairs = []
    for i, r in enumerate(rows, start=2):
        if not r["image"] or (labelled and not r[label_col]):
            raise DataError(path, f"line {i}: empty image or mask path" if labelled else f"line {i}: empty image path")
        item = {"id": r.get("id") or _stem(r["image"]), "image": str(root / r["image"])}
        if labelled:
            item["label"] = str(root / r[label_col])
        if r.get("split"):
            item["split"] = r["split"]
        pairs.append(item)
    return pairs


def _decathlon_pairs(path: Path, root: Path, labelled: bool = True) -> list[dict]:
    data = json.loads(path.read_text())
    pairs = []
    for key, items in data.items():
        if not isinstance(items, list):
            continue
        split = DECATHLON_SPLITS.get(key, key)
        for i, it in enumerate(items):
            if isinstance(it, str):  # decathlon "test": [paths] lists images without labels
                if not labelled:
                    pairs.append({"id": _stem(it), "image": str(root / it), "split": split})
                continue
            if not isinstance(it, dict) or "image" not in it or (labelled and "label" not in it):
                raise DataError(path, f"{key}[{i}]: each item needs 'image'" + (" and 'label'" if labelled else ""))
            item = {"id": it.get("id") or _stem(it["image"]), "image": str(root / it["image"]), "split": split}
            if labelled:
                item["label"] = str(root / it["label"])
            pairs.append(item)
    return pairs


def _assign_splits(spec: DatasetSpec, pairs: list[dict], problems: list[DataError]) -> None:
    if spec.split is None:
        return
    path = spec.root / spec.split
    if not path.is_file():
        # the default split.json is optional where the datalist already assigns splits or none are needed
        if not spec.splits or any(p.get("split") for p in pairs):
            return
        problems.append(DataError(path, "split file not found"))
        return
    try:
        splits = json.loads(path.read_text())
    except ValueError as e:
        problems.append(DataError(path, f"split file is not valid JSON ({e})"))
        return
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        problems.append(DataError(path, "split file must map split names to lists of ids"))
        return
    by_id = {p["id"]: p for p in pairs}
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        for sid in ids:
            if sid in seen:
                problems.append(DataError(path, f"id {sid!r} is in both {seen[sid]!r} and {name!r}"))
                continue
            seen[sid] = name
            if sid not in by_id:
                problems.append(DataError(path, f"split {name!r} lists {sid!r}, which has no image in {spec.root / spec.images}"))
                continue
            by_id[sid]["split"] = name


def discover_pairs(spec: DatasetSpec, skipped: list[str] | None = None) -> tuple[list[dict], list[DataError]]:
    """All pairs (image-only datasets: items) of ``spec`` with their split, and the problems found (missing folders,
    unknown ids, overlapping splits, missing required splits, a folder without images). Files are not opened here:
    see :mod:`medhybrid.data.check`. ``skipped`` collects the files an image-only folder holds that are not images."""
    problems: list[DataError] = []
    if spec.datalist:
        path = spec.root / spec.datalist
        if not path.is_file():
            return [], [DataError(path, "datalist file not found")]
        try:
            read = _csv_pairs if path.suffix.lower() == ".csv" else _decathlon_pairs
            pairs = read(path, spec.root, spec.labelled)
        except DataError as e:
            return [], [e]
        except (ValueError, OSError) as e:
            return [], [DataError(path, f"cannot read datalist ({e})")]
    elif not spec.labelled:
        pairs = _folder_images(spec, problems, skipped if skipped is not None else [])
        if not pairs:
            return pairs, problems
    else:
        pairs = _folder_pairs(spec, problems)
    ids = [p["id"] for p in pairs]
    dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    for d in dup:
        problems.append(DataError(spec.root, f"id {d!r} appears more than once"))
    _assign_splits(spec, pairs, problems)
    if not pairs:
        problems.append(DataError(spec.root, "dataset is empty: no " + ("image/mask pairs" if spec.labelled else "images") + " found"))
        return pairs, problems
    present = {p.get("split") for p in pairs}
    for required in spec.splits:
        if required not in present:
            problems.append(DataError(spec.root, f"{spec.role} dataset has no {required!r} split (splits found: "
                                                 f"{sorted(s for s in present if s)})"))
    return pairs, problems


def load_pairs(spec: DatasetSpec, split: str | Sequence[str] | None = None) -> list[dict]:
    """Pairs of the given split(s); raises :class:`DataError` listing every problem found."""
    pairs, problems = discover_pairs(spec)
    if problems:
        raise DataError(None, f"dataset {spec.name!r} has {len(problems)} problem(s):\n  "
                        + "\n  ".join(str(p) for p in problems[:20]))
    return select_split(pairs, split)


def select_split(pairs: list[dict], split: str | Sequence[str] | None) -> list[dict]:
    """The pairs of ``split`` (one name or several; None: all of them)."""
    if split is None:
        return pairs
    wanted = {split} if isinstance(split, str) else set(split)
    return [p for p in pairs if p.get("split") in wanted]


def few_shot_ids(pool_ids: Sequence[str], budget: int, seed: int) -> list[str]:
    """A deterministic subset of ``budget`` ids from ``pool_ids`` for ``seed``.

    The pool is sorted, permuted once by ``seed`` and cut at ``budget``, so subsets are nested:
    the budget-5 subset of a seed is the first five of its budget-10 subset.
    """
    pool = sorted(set(pool_ids))
    if budget < 1:
        raise ValueError(f"label budget must be at least 1, got {budget}")
    if budget > len(pool):
        raise ValueError(f"label budget {budget} is larger than the pool ({len(pool)} labelled images)")
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:budget]]


def few_shot_pairs(spec: DatasetSpec, budget: int | None, seed: int, pool_split: str = "pool",
                   exclude_split: str = "test", ids: Sequence[str] | None = None) -> list[dict]:
    """Training pairs for a few-shot run: ``budget`` pairs from the ``pool`` split (all of it for None), or
    the pool pairs of ``ids`` in that order (an id outside the pool raises).

    Only the pool is ever drawn from; a pair of ``exclude_split`` (the held-out test split) cannot
    enter, and an id listed in both raises.
    """
    if not spec.labelled:
        raise ValueError(f"dataset {spec.name!r} has no masks (masks: null): few-shot training needs labelled images")
    pairs = load_pairs(spec)
    pool = [p for p in pairs if p.get("split") == pool_split]
    held = {p["id"] for p in pairs if p.get("split") == exclude_split}
    if not pool:
        raise ValueError(f"dataset {spec.name!r} has no {pool_split!r} split to draw labelled images from")
    if ids is not None:
        ids = list(ids)
        outside = [i for i in ids if i not in {p["id"] for p in pool}]
        if outside:
            raise ValueError(f"ids {outside[:5]} are not in the {pool_split!r} split of dataset {spec.name!r}")
    else:
        ids = [p["id"] for p in pool] if budget is None else few_shot_ids([p["id"] for p in pool], budget, seed)
    leaked = held.intersection(ids)
    if leaked:
        raise ValueError(f"{exclude_split!r} images {sorted(leaked)[:5]} would enter a training subset")
    by_id = {p["id"]: p for p in pool}
    return [by_id[i] for i in ids]


__all__ = ["DECATHLON_SPLITS", "discover_pairs", "few_shot_ids", "few_shot_pairs", "load_pairs", "select_split"]
