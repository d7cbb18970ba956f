"""What the MONAI bundles in ``bundles/`` call from their configs (``$medhybrid.workflows.bundle.<name>(...)``): datalists
(labelled, and the unlabelled images that semi-supervised training reads), the semi-supervised seams of
``train.json``, the bundle's weights file, and publishing a pretraining run's weights into a bundle.

A bundle's weights (``models/model.pt``, ``models/pretrained.pt``) are plain state dicts of its ``network_def``, as
MONAI's ``CheckpointLoader``, ``ckpt_export`` and MONAI Label's bundle tasks read them; the configs say everything
else (preprocessing, network size), so a bundle folder and the installed package are all a user needs.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.engines.utils import default_prepare_batch
from torch import nn

from medhybrid.core.config import deep_merge, dump_config
from medhybrid.core.files import atomic_write, sha256, write_json
from medhybrid.data.datasets import discover_pairs, load_pairs, select_split
from medhybrid.data.io import DataError
from medhybrid.data.specs import load_dataset_spec
from medhybrid.data.unlabelled import MixedDataset
from medhybrid.engines import semi as S
from medhybrid.engines.handlers import WiSEFT, unwrap
from medhybrid.engines.losses import SegmentationLoss
from medhybrid.engines.robust import RehearsalConfig
from medhybrid.networks.checkpoints import NOTE_SUFFIX, atomic_save, load_model, weights_note
from medhybrid.workflows.adapt import FIXMATCH_RECIPE, KEEP, ROBUST_RECIPE, AdaptConfig, pairs_dataset, parse_choice, run_adaptation
from medhybrid.workflows.inference import bundle_segmenter, collect_inputs

log = logging.getLogger("medhybrid")


def image_datalist(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """``[{"image": path}, ...]`` for every supported image file in a folder (sorted, not recursive), a file, or a
    list of both (:func:`medhybrid.workflows.inference.collect_inputs`); raises :class:`DataError` when there is none."""
    return [{"image": str(p)} for p in collect_inputs(inputs)]


def labelled_datalist(source: str | os.PathLike, split: str | Sequence[str] | None = None, channels: int | None = None,
                      allow_unlabelled: bool = False) -> list[dict]:
    """``[{"image", "label"}, ...]`` of ``split`` from a labelled dataset: a folder with ``images/`` and ``masks/``
    (each mask named as its image, splits from an optional ``split.json``), a decathlon-style JSON datalist (its
    ``training`` section is the split ``train``, ``validation`` is ``val``, ``test`` is ``test``), a CSV datalist,
    a medhybrid dataset YAML or a shipped dataset name (``ph2``: splits ``pool`` and ``test``).

    ``split`` None, or a source that assigns no splits, takes every pair. ``channels`` (1 or 3) completes a folder or
    datalist that does not say.
    Raises :class:`DataError` naming every problem found (missing masks, unreadable split files, an empty split).
    With ``allow_unlabelled``, an image of a folder whose mask is missing is left out instead (a training's unlabelled
    image, :func:`unlabelled_datalist`).
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
    if missing and allow_unlabelled and p.is_dir():
        pairs = [q for q in pairs if Path(q["label"]).is_file()]
        missing = [] if pairs else missing
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(source, f"{len(missing)} mask(s) not found: {shown}")
    return [{"image": q["image"], "label": q["label"]} for q in pairs]


def unlabelled_datalist(source: str | os.PathLike, split: str | Sequence[str] | None = None,
                        extra: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> list[dict]:
    """``[{"image"}, ...]``: the images a semi-supervised training reads without masks. From a folder with
    ``images/`` and ``masks/``: the images of ``split`` that have no mask file (yet); and every image file of
    ``extra`` (a folder, or a list of files and folders: a clinic's archive, the unlabelled studies of MONAI Label).
    A shipped dataset name or a datalist gives none of its own (their images all have masks)."""
    items: list[dict] = []
    p = Path(source)
    if p.is_dir() and (p / "images").is_dir() and (p / "masks").is_dir():
        spec = load_dataset_spec(source, overrides=["channels=1", "required_splits=[]"])  # only paths are read here
        pairs, _ = discover_pairs(spec)
        if any(q.get("split") for q in pairs):
            pairs = select_split(pairs, split)
        items += [{"image": q["image"]} for q in pairs if not Path(q["label"]).is_file()]
    if extra:
        items += image_datalist(extra)
    if items:
        log.info("%d image(s) without masks for semi-supervised training (%s)", len(items),
                 ", ".join(Path(d["image"]).name for d in items[:3]) + (" ..." if len(items) > 3 else ""))
    return items


def semi_seams(algorithm: str, labelled, unlabelled, batch_size: int, iterations: int, seed: int = 0,
               mask_channels: int = 1, settings: dict | None = None) -> dict:
    """What a bundle's ``train.json`` trains with: ``dataset``, ``batch_size``, ``per_batch`` (labelled, unlabelled
    rows of a batch, for :class:`~medhybrid.engines.batches.MixedBatchSampler`), ``prepare_batch``, ``loss`` and ``attach``
    (to call with the trainer). ``labelled`` and ``unlabelled`` are the two datasets, the second's items an ``image``
    (and, for FixMatch, its ``image_strong`` view). The network is the bundle's mask-only ``Segmenter``, so the
    algorithm is ``mean-teacher`` or ``fixmatch`` (:mod:`medhybrid.engines.semi`); ``none``, or no unlabelled image, trains
    on the labels alone exactly as before. ``settings`` are :class:`~medhybrid.engines.semi.SemiConfig` fields."""
    cfg = S.SemiConfig(algorithm=algorithm, **(settings or {}))
    if cfg.enabled and cfg.method.needs_image_channels:
        raise ValueError(f"a bundle's network outputs mask logits only: semi-supervised algorithm {cfg.algorithm!r} needs "
                         "a medhybrid model (medhybrid finetune); use one that reads mask logits alone (mean-teacher, fixmatch)")
    on = cfg.enabled and len(unlabelled) > 0
    kl, ku = (batch_size, cfg.unlabelled_batch) if on else (batch_size, 0)
    seams = {"dataset": MixedDataset(labelled, unlabelled if on else [], views=cfg.views if on else ()),
             "batch_size": kl + ku, "per_batch": (kl, ku), "prepare_batch": default_prepare_batch,
             "loss": SegmentationLoss(mask_channels)}
    if not on:
        if cfg.enabled:
            log.warning("%s: no unlabelled image to learn from: training on the %d labelled ones alone", algorithm, len(labelled))
        seams["attach"] = lambda trainer: None
        return seams
    prepare, loss = S.prepare_and_loss(cfg, iterations, 0, mask_channels, seed)
    log.info("semi-supervised fine-tuning (%s): %d labelled, %d unlabelled images", cfg.algorithm, len(labelled), len(unlabelled))
    seams.update(prepare_batch=prepare, loss=loss, attach=prepare.attach)
    return seams


def strong_views(algorithm: str, resolution: int, settings: dict | None = None) -> list:
    """The transforms that give an unlabelled item its strongly augmented view (FixMatch); none otherwise."""
    return S.SemiConfig(algorithm=algorithm, **(settings or {})).strong_transforms(resolution)


def adapt_bundle(bundle_root: str | os.PathLike, datalist: Sequence[dict], unlabelled: Sequence[dict], image_channels: int,
                 label_values: dict | None, label_threshold: float | None, start: str | os.PathLike,
                 model_path: str | os.PathLike, output_dir: str | os.PathLike, semi_algorithm: str = "none",
                 semi_settings: dict | None = None, learning_rate: float | None = None, per_label: int | None = None,
                 min_iterations: int | None = None, max_iterations: int | None = None, seed: int = 0,
                 rule: dict | None = None, rehearsal: str | os.PathLike | dict | None = None,
                 rehearsal_share: float = 0.25) -> dict:
    """A bundle's ``train.json`` with ``adapt: true``: :func:`medhybrid.workflows.adapt.run_adaptation` from the
    weights ``start`` (by default the served ``models/model.pt``) on the labelled ``datalist`` (and the ``unlabelled``
    images, for a semi-supervised candidate when the bundle trains with one), in ``output_dir/adapt``, with the decision
    rule's defaults or ``rule`` (:class:`~medhybrid.workflows.adapt.AdaptRule` fields). Masks are read with
    ``label_threshold`` when it is given, else with ``label_values``. With ``rehearsal`` (the source's labelled images:
    a shipped name, a dataset YAML or a folder with ``split.json``, its ``train`` split), the menu gains source
    rehearsal, ``rehearsal_share`` of each batch drawn from them (:class:`~medhybrid.engines.robust.RehearsalConfig`),
    checked like every other candidate.

    The bundle's weights file ``model_path`` ends up holding the adaptation's outcome, the start or the chosen
    fine-tune, and is written only when it does not hold it already: with the served weights as the start and the
    start kept, it is not touched.

    - When the served weights are themselves an earlier adaptation's outcome (their note names its ``base``), the
      adaptation starts again from that base on all the labels given: scoring the served weights on labels they were
      trained on would flatter them, and every fold would start from weights that saw its held-out image.
    - Before a fine-tune of the served weights replaces them, they are kept as ``<model_path stem>.base.pt`` beside
      it, the base of the next adaptation.

    Returns ``{"decision", "reason", "replaced", "start", "labels", "report"}``, also written as
    ``output_dir/adapt/outcome.json``; each training has its own folder under ``output_dir/adapt/runs``, and the last
    one's ``report.md``, ``report.json`` and ``model.pt`` are copied to ``output_dir/adapt``."""
    top = Path(output_dir) / "adapt"
    out = top / "runs" / time.strftime("%Y%m%d-%H%M%S")  # each training its own run; the last one's report on top
    model_path = Path(model_path)
    start = adaptation_base(start, model_path)
    if label_threshold is not None:
        mask = {"threshold": label_threshold}
    elif label_values:
        mask = {"values": {int(k): int(v) for k, v in label_values.items()}}
    else:
        mask = None
    spec = pairs_dataset(datalist, image_channels, out / "work", Path(bundle_root).resolve().name, mask)
    recipes: dict = {"plain": {}, "robust": ROBUST_RECIPE}
    if rehearsal is not None:  # checked now (a clear error before anything trains), passed resolved
        recipes["rehearsal"] = {"robust": {"rehearsal": dump_config(RehearsalConfig(dataset=rehearsal, share=rehearsal_share))}}
    if semi_algorithm != "none" and unlabelled:
        recipes[semi_algorithm] = ({"semi": {"algorithm": semi_algorithm, **(semi_settings or {})}}
                                   if semi_algorithm != "fixmatch" else deep_merge(FIXMATCH_RECIPE, {"semi": semi_settings or {}}))
    schedule = {k: v for k, v in {"per_label": per_label, "min_iterations": min_iterations,
                                  "max_iterations": max_iterations}.items() if v is not None}
    finetune = {**({"schedule": schedule} if schedule else {}), **({"train": {"lr": learning_rate}} if learning_rate else {})}
    cfg = AdaptConfig(model=Path(bundle_root), weights=start, data=spec, output_dir=out, recipes=recipes,
                      unlabelled_images=[str(d["image"]) for d in unlabelled], finetune=finetune, seed=seed,
                      rule=rule or {}, mlflow={"enabled": False})
    res = run_adaptation(cfg)
    for name in ("report.md", "report.json", "model.pt"):
        shutil.copyfile(out / name, top / name)
    before = sha256(model_path) if model_path.is_file() else None
    start_is_served = before == sha256(start)
    if res.decision == KEEP:
        if not start_is_served:  # serve the start, with its own note
            net, _ = bundle_segmenter(bundle_root, start)
            save_weights(net, model_path, note={k: v for k, v in (weights_note(start) or {"holds": "trained",
                         "by": f"weights from {start.name}"}).items() if k != "sha256"})
        what = f"the start ({_shown(start, model_path)}), kept over its fine-tunes"
    else:
        base = start
        if start_is_served:  # keep the served weights, the start, as the base of the next adaptation
            base = model_path.with_name(model_path.stem + ".base" + model_path.suffix)
            with atomic_write(base) as tmp:
                shutil.copyfile(model_path, tmp)
            write_json(Path(str(base) + NOTE_SUFFIX), {**(weights_note(model_path) or {"holds": "trained"}),
                                                       "sha256": sha256(base)})
        alpha = parse_choice(res.decision)[1]
        net, meta = load_model(res.model)
        note = {"holds": "mixed", "wise": alpha} if alpha < 1 else {"holds": "trained"}
        save_weights(net, model_path, note={**note, "by": "medhybrid adapt", "decision": res.decision,
                                            "base": _shown(base, model_path), "base_sha256": sha256(base),
                                            "labels_sha256": meta["adapt"]["labels_sha256"]})
        what = f"{res.decision}, a fine-tune of {_shown(start, model_path)}"
    replaced = sha256(model_path) != before
    log.info("adapt: %s; %s (%s)", res.decision, f"{model_path} replaced by {what}" if replaced else
             f"{model_path} kept as it was", res.reason)
    outcome = {"decision": res.decision, "reason": res.reason, "replaced": replaced, "start": str(start.resolve()),
               "labels": len(datalist), "report": str(top / "report.md")}
    write_json(top / "outcome.json", outcome)
    return outcome


def rehearsal_needs_adapt(rehearsal: str | os.PathLike | dict | None, adapt: bool) -> None:
    """``train.json``'s source rehearsal (``rehearsal_dataset``) is a candidate of the adaptation's menu: refused,
    naming the setting, where the bundle trains without the check (``adapt`` false, its multi-GPU training)."""
    if rehearsal is not None and not adapt:
        raise ValueError(f"rehearsal_dataset {rehearsal!r}: source rehearsal is a candidate of the adaptation "
                         "(adapt true, on one device); this training runs without the check")


def adaptation_base(start: str | os.PathLike, model_path: str | os.PathLike) -> Path:
    """The weights an adaptation of a bundle starts from: ``start``, unless it is the served ``model_path`` and that
    holds an earlier adaptation's outcome, whose note names its base (the weights it was adapted from, which never saw
    the user's labels): then the base, checked against the hash the note keeps. Raises :class:`DataError` naming the
    served weights when their base is gone or changed."""
    start, model_path = Path(start), Path(model_path)
    note = weights_note(model_path) if model_path.is_file() else None
    if not (note and note.get("base")) or not start.is_file() or sha256(start) != sha256(model_path):
        return start
    base = Path(note["base"]) if Path(note["base"]).is_absolute() else model_path.parent / note["base"]
    if not base.is_file() or sha256(base) != note.get("base_sha256"):
        raise DataError(model_path, f"holds an adaptation of {base} to earlier labels, and {base} is "
                        f"{'missing' if not base.is_file() else 'not the file it was adapted from'}: an adaptation must "
                        "start from weights that never saw your labels; pass them as adapt_start (e.g. "
                        "models/pretrained.pt)")
    log.info("adapt: %s holds an adaptation to earlier labels: adapting %s, the weights it started from, to all the "
             "labels given", model_path, base)
    return base


def _shown(path: Path, model_path: Path) -> str:
    """``path`` relative to the folder of ``model_path`` when it lies there (a bundle's ``models/``), else absolute."""
    path = Path(path).resolve()
    return path.name if path.parent == Path(model_path).resolve().parent else str(path)


def save_weights(network: nn.Module, path: str | os.PathLike, handlers: Sequence | None = None,
                 note: dict | None = None) -> Path | None:
    """Write ``network``'s state dict (unwrapped from DistributedDataParallel) to ``path`` atomically, from rank 0
    only; other ranks return None. This is how a bundle's training publishes ``models/model.pt``. The note beside it
    (:func:`weights_note`) says what it holds: ``note``, else ``mixed`` when one of the trainer's ``handlers`` is a
    :class:`~medhybrid.engines.handlers.WiSEFT` that interpolated, else ``trained``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    state = {k: v.detach().cpu() for k, v in unwrap(network).state_dict().items()}
    out = atomic_save(state, path)
    if note is None:
        mixed = [h for h in handlers or [] if isinstance(h, WiSEFT) and h.applied]
        note = ({"holds": "mixed", "wise": mixed[0].alpha, "start": "the weights training started from", "by": "train.json"}
                if mixed else {"holds": "trained", "by": "train.json"})
    write_json(Path(str(path) + NOTE_SUFFIX), {**note, "sha256": sha256(out)})
    log.info("bundle weights written: %s (sha256 %s; %s)", out, sha256(out)[:12], note["holds"])
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
    return save_weights(net, path, note={"holds": "pretrained", "by": f"a medhybrid run ({Path(checkpoint).name})"})


__all__ = ["NOTE_SUFFIX", "adapt_bundle", "adaptation_base", "rehearsal_needs_adapt", "image_datalist",
           "labelled_datalist", "publish_weights", "save_weights", "semi_seams", "sha256", "strong_views",
           "unlabelled_datalist", "weights_note"]
