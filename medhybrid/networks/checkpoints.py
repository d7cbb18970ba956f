"""Model files and checkpoints: how a network is written to disk and read back.

- a *model file* (``model.pt`` of a pretraining or fine-tuning run) is ``{"state_dict", "meta"}``: tensors and plain
  values only, read with ``torch.load(weights_only=True)``; ``meta`` (:func:`network_meta`) says everything needed to
  rebuild the network and preprocess its inputs;
- a *training checkpoint* (``checkpoints/<prefix>_<iteration>.pt``) is Ignite's, written atomically by the engine
  (:func:`medhybrid.engines.fit.fit`); :func:`latest_checkpoint` finds the one a run resumes from;
- :func:`transfer_weights` copies weights between networks by name and shape (MONAI's ``copy_model_state``): only the
  output head may differ, named in the log; anything else fails (nnU-Net's ``load_pretrained_weights``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.utils import copy_model_state
from torch import nn

from medhybrid.core.config import dump_config
from medhybrid.core.files import atomic_write
from medhybrid.data.io import DataError
from medhybrid.data.specs import DatasetSpec, Preprocess
from medhybrid.networks.nets import EDMPrecond, ModelConfig, build_network

log = logging.getLogger("medhybrid")


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`medhybrid.core.files.atomic_write`)."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def network_meta(net: EDMPrecond, model_cfg: ModelConfig, preprocess: Preprocess, dataset: DatasetSpec | str, mode: str,
                 num_classes: int | None = None) -> dict:
    """What a ``model.pt`` says of itself: mode, channels, classes, the data it learnt from, network and preprocessing
    (``dataset`` a spec, or a name with ``num_classes`` for pretraining without a labelled dataset)."""
    name, classes = (dataset, num_classes) if isinstance(dataset, str) else (dataset.name, dataset.mask.num_classes)
    return {"mode": mode, "image_channels": net.image_channels, "mask_channels": net.mask_channels,
            "num_classes": classes, "dataset": name, "model": dump_config(model_cfg), "preprocess": dump_config(preprocess)}


def save_model(net: nn.Module, meta: dict, path: str | os.PathLike) -> Path:
    """``{"state_dict", "meta"}``: tensors and plain values only, for ``torch.load(weights_only=True)``."""
    return atomic_save({"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "meta": meta}, path)


def read_model_file(path: str | os.PathLike, map_location="cpu", allow_bare: bool = False) -> dict:
    """The content of a model file (``{"state_dict", "meta"}``, or a DDPM-features head's ``{"ensemble", "meta"}``),
    tensors on ``map_location``, read with ``weights_only=True``: nothing in the file can run code. Raises
    :class:`~medhybrid.data.io.DataError` naming the file when it is missing or is not a medhybrid model file.
    ``allow_bare`` also accepts a plain state dict (a MONAI bundle's weights: ``{name: tensor}``)."""
    if not Path(path).is_file():
        raise DataError(path, "model file not found")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # not a pickle at all
            raise DataError(path, "is not a model file (not a PyTorch file, or a damaged one)") from e
        # a PyTorch file whose pickle names classes or functions: loading it could run code
        raise DataError(path, "is a PyTorch file holding Python objects besides tensors and plain values; medhybrid "
                        "only reads weights and metadata, so it does not open it (whole pickled models and "
                        "training states of other tools are not model files)") from e
    except Exception as e:  # torch's own text would suggest weights_only=False: never for a file of unknown origin
        raise DataError(path, f"is not a model file (not a PyTorch file, or a damaged one: {type(e).__name__})") from e
    if allow_bare and isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return content
    if not isinstance(content, dict) or "meta" not in content:
        raise DataError(path, "holds weights without medhybrid's metadata (a MONAI bundle's models/*.pt?): pass the "
                        "bundle's folder instead, or the model.pt of a medhybrid pretraining or fine-tuning run")
    return content


_META_CACHE: dict[tuple[str, int, int], dict] = {}


def model_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` of a model file, read once per version of the file (keyed by path, size and modification time):
    an ablation asks every fine-tune's checkpoint for it."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _META_CACHE:
        _META_CACHE[key] = read_model_file(path)["meta"]
    return _META_CACHE[key]


def load_model(path: str | os.PathLike, map_location="cpu") -> tuple[EDMPrecond, dict]:
    """Rebuild the network saved by :func:`save_model`, with its metadata."""
    ckpt = read_model_file(path, map_location)
    meta = ckpt["meta"]
    try:
        net = build_network(ModelConfig(**meta["model"]), meta["image_channels"], meta["num_classes"])
        net.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # metadata or weights of another tool or version
        raise DataError(path, f"has metadata or weights that do not describe a medhybrid network ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from e
    return net, meta


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest training checkpoint (highest iteration) in ``folder/checkpoints``, or None."""
    found = []
    for p in glob.glob(str(Path(folder) / "checkpoints" / "*.pt")):
        m = re.search(r"_(\d+)\.pt$", p)
        if m:
            found.append((int(m.group(1)), Path(p)))
    return max(found)[1] if found else None


HEAD = ("backbone.out.2.conv.",)
"""The network's output convolution: its shape follows the image and mask channels, so a checkpoint of another number
of classes differs there and only there."""


def transfer_weights(net: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint",
                     head: Sequence[str] = HEAD) -> dict:
    """Copy ``state_dict`` into ``net`` by name and shape (MONAI's ``copy_model_state``), as nnU-Net's
    ``load_pretrained_weights`` does: only the tensors under ``head`` may differ (a checkpoint of another number of
    classes); they are named in the log and keep their initial values. Any other mismatch (a tensor the network lacks
    or the checkpoint lacks, a shape that differs outside the head) raises :class:`~medhybrid.data.io.DataError` naming
    every one of them: it means another architecture, not another task.

    Returns ``{"loaded": [...], "skipped": {name: reason}, "missing": [...]}``."""
    own = net.state_dict()
    skipped = {k: "not in the network" if k not in own else
               f"shape {tuple(v.shape)} in {source}, {tuple(own[k].shape)} in the network"
               for k, v in state_dict.items() if k not in own or own[k].shape != v.shape}
    missing = [k for k in own if k not in state_dict]
    bad = [f"{k} ({why})" for k, why in skipped.items() if not k.startswith(tuple(head))]
    bad += [f"{k} (not in {source})" for k in missing if not k.startswith(tuple(head))]
    if bad:
        shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise DataError(source, f"does not fit the network outside its output head ({len(bad)} tensor(s)): {shown}")
    _, loaded, _ = copy_model_state(net, {k: v for k, v in state_dict.items() if k not in skipped}, inplace=True)
    for k, why in skipped.items():
        log.warning("weight transfer from %s: SKIPPED %s (%s): the output head, initialised for this task", source, k, why)
    for k in missing:
        log.warning("weight transfer from %s: MISSING %s (the output head, left at its initial value)", source, k)
    log.info("weight transfer from %s: %d tensors loaded, %d skipped, %d missing", source, len(loaded), len(skipped), len(missing))
    return {"loaded": list(loaded), "skipped": skipped, "missing": missing}


def interpolate_weights(pretrained: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT (Wortsman et al. 2022, eq. 1): ``(1 - alpha) * pretrained + alpha * finetuned`` for every floating
    tensor; integer buffers (counters) are the fine-tuned ones. Both must hold the same names and shapes."""
    if set(pretrained) != set(finetuned):
        diff = sorted(set(pretrained) ^ set(finetuned))
        raise ValueError(f"the two weight sets differ in {len(diff)} tensor(s), e.g. {diff[:3]}")
    out = {}
    for k, ft in finetuned.items():
        pre = pretrained[k]
        if pre.shape != ft.shape:
            raise ValueError(f"{k}: shape {tuple(pre.shape)} (pretrained) vs {tuple(ft.shape)} (fine-tuned)")
        out[k] = (1 - alpha) * pre + alpha * ft if ft.is_floating_point() else ft.clone()
    return out


NOTE_SUFFIX = ".json"
"""A bundle's weights file (a bare state dict) has its note beside it: ``models/model.pt`` and ``models/model.pt.json``."""


def weights_note(path: str | os.PathLike) -> dict | None:
    """What a bundle's weights file holds, from the note beside it (``<file>.json``): ``{"holds": "trained" |
    "mixed" | "pretrained", "wise": alpha of a mix, "start": the weights it was mixed with, "by": what wrote it,
    "sha256"}``, and for an adaptation's outcome ``"base"`` (the weights it started from, never trained on the user's
    labels) and ``"labels_sha256"`` (the images it was adapted on); None for a file without a note."""
    note = Path(str(path) + NOTE_SUFFIX)
    return json.loads(note.read_text()) if note.is_file() else None


__all__ = ["_META_CACHE", "atomic_save", "HEAD", "interpolate_weights", "latest_checkpoint", "load_model", "model_meta", "network_meta",
           "NOTE_SUFFIX", "read_model_file", "save_model", "transfer_weights", "weights_note"]
