"""What the MONAI bundles in ``bundles/`` call from their configs (``$medhybrid.bundle.<name>(...)``): datalists,
the bundle's weights file, and publishing a pretraining run's weights into a bundle.

A bundle's weights (``models/model.pt``, ``models/pretrained.pt``) are plain state dicts of its ``network_def``, as
MONAI's ``CheckpointLoader``, ``ckpt_export`` and MONAI Label's bundle tasks read them; the configs say everything
else (preprocessing, network size), so a bundle folder and the installed package are all a user needs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from medhybrid.checkpoints import atomic_save, load_model
from medhybrid.config import load_dataset_spec
from medhybrid.datasets import load_pairs, select_split
from medhybrid.engines import unwrap
from medhybrid.inference import collect_inputs
from medhybrid.io import DataError

log = logging.getLogger("medhybrid")


def image_datalist(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """``[{"image": path}, ...]`` for every supported image file in a folder (sorted, not recursive), a file, or a
    list of both (:func:`medhybrid.inference.collect_inputs`); raises :class:`DataError` when there is none."""
    return [{"image": str(p)} for p in collect_inputs(inputs)]


def labelled_datalist(source: str | os.PathLike, split: str | Sequence[str] | None = None, channels: int | None = None) -> list[dict]:
    """``[{"image", "label"}, ...]`` of ``split`` from a labelled dataset: a folder with ``images/`` and ``masks/``
    (each mask named as its image, splits from an optional ``split.json``), a decathlon-style JSON datalist (its
    ``training`` section is the split ``train``, ``validation`` is ``val``, ``test`` is ``test``), a CSV datalist,
    a medhybrid dataset YAML or a shipped dataset name (``ph2``: splits ``pool`` and ``test``).

    ``split`` None, or a source that assigns no splits, takes every pair. ``channels`` (1 or 3) completes a folder or
    datalist that does not say.
    Raises :class:`DataError` naming every problem found (missing masks, unreadable split files, an empty split).
    """
    p = Path(source)
    # a folder or datalist is whatever the user labelled: no splits are required of it
    overrides = ([f"channels={channels}"] if channels else []) + ["required_splits=[]"] if p.exists() else []
    spec = load_dataset_spec(source, overrides=overrides)
    if not spec.labelled:
        raise DataError(source, "has no masks: a folder needs images/ and masks/, a datalist a label (or mask) column")
    pairs = load_pairs(spec)
    if any(q.get("split") for q in pairs):  # a source without splits is all one split
        pairs = select_split(pairs, split)
    if not pairs:
        raise DataError(source, f"has no labelled images in split {split!r}" if split else "has no labelled images")
    missing = [q["label"] for q in pairs if not Path(q["label"]).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(source, f"{len(missing)} mask(s) not found: {shown}")
    return [{"image": q["image"], "label": q["label"]} for q in pairs]


def save_weights(network: nn.Module, path: str | os.PathLike) -> Path | None:
    """Write ``network``'s state dict (unwrapped from DistributedDataParallel) to ``path`` atomically, from rank 0
    only; other ranks return None. This is how a bundle's training publishes ``models/model.pt``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    state = {k: v.detach().cpu() for k, v in unwrap(network).state_dict().items()}
    out = atomic_save(state, path)
    log.info("bundle weights written: %s (sha256 %s)", out, sha256(out)[:12])
    return out


def publish_weights(checkpoint: str | os.PathLike, path: str | os.PathLike, network: nn.Module | None = None) -> Path:
    """Publish the weights of a medhybrid run (``model.pt`` of a pretraining or fine-tuning run) as a bundle's
    weights file: its state dict alone, atomically. With ``network`` (the bundle's ``network_def``), the weights
    are first loaded into it strictly, so a size mismatch with the bundle's config fails here, naming both."""
    net, _ = load_model(checkpoint)
    if network is not None:
        try:
            network.load_state_dict(net.state_dict(), strict=True)
        except RuntimeError as e:
            raise DataError(checkpoint, f"does not fit the bundle's network_def: {e}") from e
    return save_weights(net, path)  # type: ignore[return-value]


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex), as ``large_files.yml`` lists it."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
