"""nnU-Net's own process for :func:`medhybrid.experiments.nnunet.run_nnunet`: plan, preprocess, train and predict.

    python -m medhybrid.experiments.nnunet_child <run folder> --device cpu --seed 0 --configuration 2d \\
        --trainer nnUNetTrainer_1epoch

nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment when it is imported
(:func:`medhybrid.experiments.nnunet.nnunet_env` sets them). Its integrity check, fingerprinting, preprocessing and
final validation each start a worker pool by *spawn*, and every spawned worker imports the main module again: so this
module imports nothing but the standard library at its top, and takes its settings from the command line rather than
from the run's config (whose model imports MONAI). Each worker then imports what nnU-Net's own function needs, torch
and part of nnU-Net, a few seconds less per worker than medhybrid's library would cost.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
from pathlib import Path

DATASET_ID = 1
"""Each run folder holds its own nnU-Net tree, with one dataset: ``Dataset001_<target>``."""

PREDICTIONS = "predictions"
"""The run folder's subfolder of nnU-Net's predictions (``<case>.npz`` probabilities, ``<case>.png`` labels)."""

TRAINER_MODULES = ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
                   "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs",
                   "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring")
"""Where nnU-Net's default and shortened trainers live: looked up there first, since nnU-Net's own search imports every
trainer module, transformer ones (which need timm) included."""


def trainer_class(name: str):
    """An nnU-Net trainer class by name, or by ``package.module.Class`` for a trainer of your own (a small override of
    one of nnU-Net's, importable in this process)."""
    if "." in name:
        module, _, cls = name.rpartition(".")
        return getattr(importlib.import_module(module), cls)
    for module in TRAINER_MODULES:
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:
            return cls
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"), name,
                                      "nnunetv2.training.nnUNetTrainer")
    if cls is None:
        raise ValueError(f"nnU-Net has no trainer class {name!r}")
    return cls


def train_and_predict(folder: Path, device: str, seed: int, configuration: str, trainer: str) -> None:
    """Plan, preprocess, train on every labelled case (fold ``all``) and predict ``imagesTs`` into ``folder/predictions``."""
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    dev = torch.device(device)
    raw = next(Path(nnUNet_raw).glob(f"Dataset{DATASET_ID:03d}_*"))
    augmentation_workers = os.environ.get("nnUNet_n_proc_DA")
    if augmentation_workers == "0":  # the planner sets its thread count to this: at least one while it plans
        os.environ["nnUNet_n_proc_DA"] = "1"
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, verbose=False, show_progress_bar=False)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=(configuration,), num_processes=(1,), show_progress_bar=False)
    if augmentation_workers is not None:
        os.environ["nnUNet_n_proc_DA"] = augmentation_workers
    pre = Path(nnUNet_preprocessed) / raw.name
    plans = {**json.loads((pre / "nnUNetPlans.json").read_text()), "continue_training": False}
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer_cls = trainer_class(trainer)
    torch.manual_seed(seed)
    run = trainer_cls(plans=plans, configuration=configuration, fold="all", dataset_json=dataset_json, device=dev)
    run.run_training()
    run.set_deep_supervision_enabled(False)  # as nnU-Net's own final validation: the full-resolution output only
    run.network.eval()
    # the trained network as it is in memory (nnU-Net's own final validation does the same), rather than its
    # checkpoint read back: nnU-Net's loader searches every trainer module, and unpickles
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=dev,
                                perform_everything_on_device=dev.type == "cuda", verbose=False, allow_tqdm=False)
    predictor.manual_initialization(run.network, run.plans_manager, run.configuration_manager,
                                    [copy.deepcopy(run.network.state_dict())], run.dataset_json,
                                    type(run).__name__, run.inference_allowed_mirroring_axes)
    (folder / PREDICTIONS).mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(raw / "imagesTs"), str(folder / PREDICTIONS), save_probabilities=True,
                                            overwrite=True)


def command(folder: Path, device: str, seed: int, configuration: str, trainer: str) -> list[str]:
    """The arguments after ``python -m medhybrid.experiments.nnunet_child`` for one run."""
    return [str(folder), "--device", device, "--seed", str(seed), "--configuration", configuration, "--trainer", trainer]


def main(argv: list[str] | None = None) -> None:
    """``python -m medhybrid.experiments.nnunet_child <run folder> --device ... --seed ... --configuration ... --trainer ...``."""
    ap = argparse.ArgumentParser(description="nnU-Net's process for one medhybrid nnunet run (started by run_nnunet)")
    ap.add_argument("folder", type=Path, help="the run folder (nnU-Net's folders come from the environment)")
    ap.add_argument("--device", required=True, help="cpu or cuda, resolved by the parent")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--configuration", required=True)
    ap.add_argument("--trainer", required=True)
    a = ap.parse_args(argv)
    train_and_predict(a.folder, a.device, a.seed, a.configuration, a.trainer)


__all__ = ["command", "DATASET_ID", "main", "PREDICTIONS", "train_and_predict", "trainer_class", "TRAINER_MODULES"]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
