"""Dataset checks: open every pair the way training will and report counts, sizes, class balance and
problems, so bad input is found before any training starts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medhybrid.data.datasets import discover_pairs
from medhybrid.data.io import DataError
from medhybrid.data.specs import DatasetSpec
from medhybrid.data.transforms import IGNORE_INDEX, LoadImage2Dd, MaskToLabeld


@dataclass
class CheckReport:
    dataset: str
    labelled: bool = True
    pairs: int = 0
    formats: Counter = field(default_factory=Counter)  # reader format (png, jpeg, dicom, ...) -> files
    skipped: list[str] = field(default_factory=list)  # files of an image-only folder that are not images
    splits: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)  # (H, W) -> count
    file_channels: Counter = field(default_factory=Counter)
    class_pixels: Counter = field(default_factory=Counter)  # class index -> pixels
    ignored_pixels: int = 0
    empty_masks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"dataset {self.dataset}: {self.pairs} " + ("pairs" if self.labelled else "images (no masks)")]
        if self.formats:
            lines.append("  formats: " + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())))
        if self.skipped:
            shown = ", ".join(self.skipped[:3]) + (" ..." if len(self.skipped) > 3 else "")
            lines.append(f"  skipped {len(self.skipped)} file(s) that are not images: {shown}")
        if self.splits:
            lines.append("  splits: " + ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items(), key=lambda kv: str(kv[0]))))
        if self.sizes:
            hs = [s[0] for s in self.sizes]
            ws = [s[1] for s in self.sizes]
            common = ", ".join(f"{h}x{w} ({n})" for (h, w), n in self.sizes.most_common(3))
            lines.append(f"  image size HxW: {min(hs)}..{max(hs)} x {min(ws)}..{max(ws)}; most common {common}")
        if self.file_channels:
            lines.append("  channels in files: " + ", ".join(f"{c}: {n}" for c, n in sorted(self.file_channels.items())))
        total = sum(self.class_pixels.values()) + self.ignored_pixels
        if total:
            parts = [f"class {c} {100 * n / total:.1f}%" for c, n in sorted(self.class_pixels.items())]
            parts.append(f"ignored {100 * self.ignored_pixels / total:.1f}%")
            lines.append("  pixels: " + ", ".join(parts) + f"; masks with no foreground: {self.empty_masks}")
        if self.problems:
            lines.append(f"  PROBLEMS ({len(self.problems)}):")
            lines += [f"    {p}" for p in self.problems[:50]]
            if len(self.problems) > 50:
                lines.append(f"    ... and {len(self.problems) - 50} more")
        else:
            lines.append("  no problems found")
        return "\n".join(lines)


def _check_pair(spec: DatasetSpec, pair: dict, load: LoadImage2Dd, to_label: MaskToLabeld | None):
    """Open one pair (or, with ``to_label`` None, one image) as training will; (statistics, None) or (None, problem)."""
    try:
        d = load({k: pair[k] for k in (("image", "label") if to_label else ("image",))})
        channels = int(d["image"].shape[0])
        if channels not in (1, 3, 4):
            raise DataError(pair["image"], f"image has {channels} channels; expected grey or RGB")
        if to_label is not None:
            d = to_label(d)
    except DataError as e:
        return None, str(e)
    except Exception as e:  # anything else the decoders raise still names the pair
        return None, f"{pair['image']}: {type(e).__name__}: {e}"
    size, fmt = tuple(int(s) for s in d["image"].shape[1:]), _format(d["image"])
    if to_label is None:
        return (size, channels, fmt, {}, 0), None
    lab = torch.as_tensor(d["label"])
    counts = {int(c): int((lab == c).sum()) for c in range(spec.mask.num_classes)}
    ignored = int((lab == IGNORE_INDEX).sum())
    return (size, channels, fmt, counts, ignored), None


def _format(img) -> str:
    meta = getattr(img, "meta", {})
    if meta.get("format") == "pil":
        return str(meta.get("pil_format") or "pil").lower()
    return str(meta.get("format", "?"))


def check_dataset(spec: DatasetSpec, splits: Sequence[str] | None = None, workers: int = 4,
                  images_only: bool = False) -> CheckReport:
    """Open every pair (of ``splits``, default all) and collect statistics and problems. An image-only dataset, or
    any dataset with ``images_only``, has only its images opened: readable, 2D, grey or RGB; no mask is needed."""
    labelled = spec.labelled and not images_only
    report = CheckReport(spec.name, labelled=labelled)
    pairs, problems = discover_pairs(spec, report.skipped)
    report.problems += [str(p) for p in problems]
    if splits:
        pairs = [p for p in pairs if p.get("split") in set(splits)]
    report.pairs = len(pairs)
    report.splits.update(p.get("split") or "(none)" for p in pairs)
    load = LoadImage2Dd(["image", "label"], label_keys=["label"]) if labelled else LoadImage2Dd(["image"])
    to_label = MaskToLabeld("label", spec.mask.values, spec.mask.ignore, spec.mask.threshold, ref_key="image") if labelled else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result, problem in pool.map(lambda p: _check_pair(spec, p, load, to_label), pairs):
            if problem:
                report.problems.append(problem)
                continue
            size, channels, fmt, counts, ignored = result
            report.sizes[size] += 1
            report.file_channels[channels] += 1
            report.formats[fmt] += 1
            if labelled:
                report.class_pixels.update(counts)
                report.ignored_pixels += ignored
                report.empty_masks += int(sum(v for c, v in counts.items() if c > 0) == 0)
    return report


def require_valid(spec: DatasetSpec, splits: Sequence[str] | None = None, images_only: bool = False) -> CheckReport:
    """Run :func:`check_dataset` and raise :class:`DataError` listing the problems, if any."""
    report = check_dataset(spec, splits, images_only=images_only)
    if not report.ok:
        raise DataError(None, f"dataset {spec.name!r} failed its check:\n" + "\n".join(
            f"  {p}" for p in report.problems[:20]) + (f"\n  ... {len(report.problems) - 20} more" if len(report.problems) > 20 else ""))
    return report


def require_readable_images(files: Sequence[str | Path], what: str = "image", workers: int = 4) -> None:
    """Open every image file as training will, as :func:`check_dataset` opens an image-only dataset's (readable, 2D,
    grey or RGB), and raise :class:`DataError` listing the problems, if any."""
    load = LoadImage2Dd(["image"])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for _, p in pool.map(lambda f: _check_pair(None, {"image": str(f)}, load, None), files) if p]
    if problems:
        raise DataError(None, f"{len(problems)} {what}(s) cannot be read:\n  " + "\n  ".join(problems[:20])
                        + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""))


__all__ = ["check_dataset", "CheckReport", "require_readable_images", "require_valid"]
