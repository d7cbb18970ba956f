"""``medhybrid`` command line: a thin layer over the Python API.

    medhybrid data check <dataset> [key=value ...]
    medhybrid pretrain --config <yaml|name> [key=value ...]
    medhybrid sample --checkpoint <ckpt> [--num N] [--steps S] [--out grid.png]
    medhybrid infer --model <model.pt> --input <folder|files ...> --output <folder> [--nifti]
    medhybrid sync <run folder> ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from medhybrid.core import runs, tracking
from medhybrid.core.config import ConfigError, apply_overrides, load_config, validate
from medhybrid.core.files import DiskFull, disk_full
from medhybrid.core.runs import RunStopped
from medhybrid.data.check import check_dataset
from medhybrid.data.io import DataError, data_error
from medhybrid.data.specs import load_dataset_spec
from medhybrid.experiments.ablation import load_ablation, run_ablation
from medhybrid.experiments.active import ActiveLearningConfig, run_active_learning
from medhybrid.experiments.report import embed_in_readme, prepare_report, write_length_curve, write_report
from medhybrid.networks.checkpoints import load_model
from medhybrid.workflows.adapt import AdaptConfig, folder_dataset, run_adaptation, starting_channels
from medhybrid.workflows.evaluate import evaluate
from medhybrid.workflows.finetune import FinetuneConfig, run_finetuning
from medhybrid.workflows.inference import infer_files
from medhybrid.workflows.pretrain import PretrainConfig, run_pretraining
from medhybrid.workflows.release import ReleaseConfig, choose_alpha
from medhybrid.workflows.sampling import sample_to_grid


def _data_check(args) -> int:
    status = 0
    for name in args.dataset:
        spec = load_dataset_spec(name, args.overrides)
        report = check_dataset(spec, args.split or None, workers=args.workers, images_only=args.images_only)
        print(report.format(), flush=True)
        status |= 0 if report.ok else 1
    return status


def _pretrain(args) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides, kind="pretrain")
    result = run_pretraining(cfg)
    print(f"pretraining done: checkpoint {result.checkpoint}  mlflow run {result.run_id}")
    return 0


def _ablate(args) -> int:
    cfg = load_ablation(args.config, args.profile, args.overrides)
    out = run_ablation(cfg)
    print(f"report: {out['report']['markdown']}\nplot:   {out['report']['plot']}")
    if out["failures"]:
        one_line = [" ".join(f.split()) for f in out["failures"]]  # one line per run: a config error spans several
        print(f"{len(out['failures'])} run(s) failed (see {cfg.folder / 'failures.log'}):", *one_line, sep="\n  ")
        return 1
    return 0


def _active(args) -> int:
    abl = load_ablation(args.config, args.profile, args.ablation_overrides or [])
    cfg = validate(ActiveLearningConfig, apply_overrides({"method": args.method}, args.overrides), source="medhybrid active")
    out = run_active_learning(abl, cfg)
    print(f"report: {out['markdown']}\nplot:   {out['plot']}")
    return 0


def _report(args) -> int:
    cfg = load_ablation(args.config, args.profile, args.overrides)
    parent = runs.read_state(cfg.folder).get("mlflow_run_id") if cfg.mlflow.enabled else None
    prepare_report(cfg, parent)  # what the folder lacks (an older version's, another reference): computed once, logged
    paths = write_report(cfg, Path(args.out) if args.out else cfg.folder / "report", parent_run_id=parent)
    print(f"report: {paths['markdown']}")
    if args.readme:
        embed_in_readme(paths["markdown"], args.readme, cfg.name)
        print(f"embedded in {args.readme}")
    return 0


def _curve(args) -> int:
    cfgs = [load_ablation(args.config, profile, args.overrides) for profile in args.profiles]
    paths = write_length_curve(cfgs, Path(args.out), baseline=args.baseline, methods=args.methods)
    print(f"curve: {paths['markdown']}")
    return 0


def _finetune(args) -> int:
    cfg = load_config(FinetuneConfig, args.config, args.overrides, kind="finetune")
    res = run_finetuning(cfg)
    print(f"fine-tuned on {len(res.ids)} labelled images: {res.checkpoint}")
    if args.evaluate:
        net, _ = load_model(res.checkpoint)
        ev = evaluate(net, cfg.dataset, cfg.preprocess, "test", out_dir=cfg.folder / "eval", progress=True)
        print(" ".join(f"{k} {v:.4f}" for k, v in ev.summary.items()), f"\nper-image: {ev.csv}")
    return 0


def _sample(args) -> int:
    path = sample_to_grid(args.checkpoint, args.out, num=args.num, steps=args.steps, seed=args.seed)
    print(f"samples written to {path}")
    return 0


def _infer(args) -> int:
    res = infer_files(args.model, args.input, args.output, nifti=args.nifti, batch_size=args.batch_size,
                      device=args.device, dicom_seg=args.dicom_seg, quality=args.quality)
    review = f"; review order: {res.quality_csv}" if res.quality_csv else ""
    print(f"{res.summary}; {len(res.written)} mask(s) in {args.output}{review}")
    return 1 if res.failures else 0


def _adapt(args) -> int:
    work = Path(args.output) / "work"
    model = Path(args.model)
    channels = starting_channels(model)
    data, unlabelled = folder_dataset(args.data, channels, work, args.data_overrides)
    # the menu's defaults seeded, so that recipes.<name>=... adds a candidate instead of replacing the menu
    menu = AdaptConfig.model_fields["recipes"].default_factory()
    cfg = validate(AdaptConfig, apply_overrides({"model": str(model), "data": data.model_dump(), "output_dir": args.output,
                                                 "unlabelled_images": unlabelled, "recipes": menu}, args.overrides),
                   source="medhybrid adapt")
    res = run_adaptation(cfg)
    print(f"decision: {res.decision} ({res.reason})\nmodel:  {res.model}\nreport: {res.report}")
    return 0


def _sync(args) -> int:
    left = {}
    for folder in args.folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no such run folder")
        left.update(tracking.sync(folder))
    waiting = {f: n for f, n in left.items() if n}
    print(f"synced {len(left) - len(waiting)} of {len(left)} run folder(s) with MLflow records waiting")
    for f, n in waiting.items():
        print(f"  {f}: {n} record(s) still waiting (tracking store unreachable)")
    return 1 if waiting else 0


def _release(args) -> int:
    cfg = validate(ReleaseConfig, {"bundle": args.bundle, "source": args.source, "source_split": args.source_split,
                                   "target": args.target, "output_dir": args.out, "seed": args.seed,
                                   "write_bundle": args.write, "criterion": args.criterion, "tolerance": args.tolerance,
                                   **({"alphas": args.alphas} if args.alphas else {})},
                   source="medhybrid release")
    report = choose_alpha(cfg)
    print(f"chosen alpha {report['chosen_alpha']:.2f}: {Path(args.out) / 'release.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medhybrid", description="Label-efficient 2D medical image segmentation "
                                "with hybrid diffusion pretraining (MONAI).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--wait", action="store_true", help="when a run folder is in use by another process, wait for it to "
                   "end instead of stopping")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    chk = data.add_parser("check", help="load every pair, print counts, sizes, class balance and problems; "
                                        "exit 1 on any problem")
    chk.add_argument("dataset", nargs="+", help="shipped dataset name (configs/data/<name>.yaml), dataset YAML, "
                                                "folder with images/ and masks/, a folder of images without masks "
                                                "(searched recursively, DICOM with or without .dcm), CSV or decathlon JSON datalist")
    chk.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a dataset field, e.g. --set mask.threshold=128, or --set channels=1 where the "
                          "files disagree on grey or RGB")
    chk.add_argument("--split", action="append", help="check only this split (repeatable)")
    chk.add_argument("--images-only", action="store_true",
                     help="open the images only, not the masks: a labelled dataset's split as unlabelled images for pretraining")
    chk.add_argument("--workers", type=int, default=4)
    chk.set_defaults(func=_data_check)

    pre = sub.add_parser("pretrain", help="pretrain a U-Net on a source domain (hybrid, supervised, diffusion, mdm, none)")
    pre.add_argument("--config", required=True, help="pretrain YAML or shipped name (configs/pretrain/<name>.yaml)")
    pre.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. mode=diffusion train.iterations=200")
    pre.set_defaults(func=_pretrain)

    ft = sub.add_parser("finetune", help="fine-tune a pretrained model.pt (or scratch) on a few target labels")
    ft.add_argument("--config", required=True, help="finetune YAML or shipped name (configs/finetune/<name>.yaml)")
    ft.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the test-split evaluation")
    ft.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. init=runs/pretrain/isic2018-hybrid/model.pt budget=5")
    ft.set_defaults(func=_finetune)

    ab = sub.add_parser("ablate", help="methods x budgets x seeds, ending in a report (Markdown, CSV, plot) and MLflow runs")
    ab.add_argument("--config", required=True, help="ablation YAML or shipped name (configs/ablation/<name>.yaml)")
    ab.add_argument("--profile", default="quick", help="quick (CPU, under 30 min a domain), standard (CPU, "
                    "about an hour a domain), compare (every method, quick schedule) or full (GPU)")
    ab.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. seeds=[0] budgets=[5]")
    ab.set_defaults(func=_ablate)

    al = sub.add_parser("active", help="next-sample strategy experiment: label the pool in uncertainty order vs random order, "
                        "fine-tune at each budget, compare test Dice (an ablation config's target and fine-tuning settings)")
    al.add_argument("--config", required=True, help="ablation YAML or shipped name (configs/ablation/<name>.yaml)")
    al.add_argument("--profile", default="quick")
    al.add_argument("--method", default="hybrid", help="the ablation method whose pretrained checkpoint is fine-tuned")
    al.add_argument("--ablation-override", dest="ablation_overrides", action="append", metavar="KEY=VALUE",
                    help="override of the ablation config (repeatable)")
    al.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. budgets=[2,5,10] seeds=[0,1] uncertainty.sigmas=[0.1]")
    al.set_defaults(func=_active)

    rp = sub.add_parser("report", help="rebuild an ablation's report from its MLflow runs (also after a partial run)")
    rp.add_argument("--config", required=True)
    rp.add_argument("--profile", default="quick")
    rp.add_argument("--readme", help="also embed the report in this Markdown file between report markers")
    rp.add_argument("--out", help="write the report to this folder (default: the ablation's report/), e.g. the same runs "
                    "compared against another reference method (reference=NAME)")
    rp.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    rp.set_defaults(func=_report)

    cv = sub.add_parser("curve", help="does the gap grow with pretraining? ablation profiles of one domain that differ in "
                        "pretraining length, compared on the labelled subsets they share")
    cv.add_argument("--config", required=True)
    cv.add_argument("--profiles", nargs="+", required=True, help="e.g. quick pretrain-500 standard")
    cv.add_argument("--baseline", default="supervised")
    cv.add_argument("--methods", nargs="+", help="default: the methods every profile ran (give KEY=VALUE overrides "
                    "before this option)")
    cv.add_argument("--out", required=True)
    cv.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    cv.set_defaults(func=_curve)

    syn = sub.add_parser("sync", help="send the MLflow records that runs kept while their tracking server was down "
                         "(mlflow-outbox.jsonl) to their MLflow runs; a run folder, or an ablation folder with its runs")
    syn.add_argument("folders", nargs="+")
    syn.set_defaults(func=_sync)

    smp = sub.add_parser("sample", help="draw joint image+mask samples from a hybrid (or diffusion) checkpoint")
    smp.add_argument("--checkpoint", required=True)
    smp.add_argument("--out", default="samples.png")
    smp.add_argument("--num", type=int, default=16)
    smp.add_argument("--steps", type=int, default=18)
    smp.add_argument("--seed", type=int, default=0)
    smp.set_defaults(func=_sample)

    inf = sub.add_parser("infer", help="segment images (PNG, JPEG, DICOM, NIfTI ...) with a model.pt: one mask per input, "
                                       "at the input's size")
    inf.add_argument("--model", required=True, help="model.pt of a pretraining or fine-tuning run (a bundle's weights run "
                     "through the bundle: python -m monai.bundle run --config_file <bundle>/configs/inference.json)")
    inf.add_argument("--input", required=True, nargs="+", help="image files and/or folders of images")
    inf.add_argument("--output", required=True, help="folder for <stem>_mask.png (0/255 binary, class index multi-class) "
                     "and quality.csv (each image's mask area and uncertainty, least certain first); exit status 1 "
                     "when a file could not be read (the others are segmented)")
    inf.add_argument("--nifti", action="store_true", help="also write <stem>_mask.nii.gz (class indices)")
    inf.add_argument("--no-quality", dest="quality", action="store_false",
                     help="no quality.csv (its uncertainty score runs the network 3 more times per image)")
    inf.add_argument("--no-dicom-seg", dest="dicom_seg", action="store_false",
                     help="no DICOM SEG beside the masks of DICOM inputs")
    inf.add_argument("--batch-size", type=int, default=1,
                     help="images per network call; a batch holds its full-size masks, so 1 keeps memory lowest")
    inf.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    inf.set_defaults(func=_infer)

    ada = sub.add_parser("adapt", help="adapt a model to your own labelled images, checking itself on them: the model is "
                         "replaced by a fine-tune only when held-out evidence on your labels says so")
    ada.add_argument("--model", required=True, help="the starting model: a medhybrid bundle's folder or a model.pt")
    ada.add_argument("--data", required=True, help="a folder with images/ and masks/ (a mask named like its image; an "
                     "image without a mask counts as unlabelled), or a CSV or decathlon JSON datalist")
    ada.add_argument("--output", default="adapted", help="folder for model.pt, report.md, report.json and the fold runs")
    ada.add_argument("--data-set", dest="data_overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="how to read the masks, e.g. mask.values={0: 0, 1: 1} or mask.threshold=128")
    ada.add_argument("overrides", nargs="*", help="adapt config overrides, e.g. rule.min_gain=0.02 'wise=[0.5,1]'")
    ada.set_defaults(func=_adapt)

    rel = sub.add_parser("release", help="weights that keep what the pretraining knew: choose a bundle's WiSE-FT mixing "
                         "weight on the source's validation split and a development half of the target's pool")
    rel.add_argument("--bundle", required=True, help="bundle folder with models/pretrained.pt and models/model.pt")
    rel.add_argument("--source", required=True, help="the pretraining's dataset, e.g. isic2018")
    rel.add_argument("--source-split", default="val")
    rel.add_argument("--target", required=True, help="the fine-tuning's dataset, e.g. ph2 (its pool is split in two)")
    rel.add_argument("--alphas", type=float, nargs="+", help="mixing weights to score (default 0 0.25 0.5 0.75 1)")
    rel.add_argument("--criterion", choices=["target-tolerance", "mean"], default="target-tolerance",
                     help="target-tolerance: the best source Dice within --tolerance of the best development Dice; "
                          "mean: the best mean of both")
    rel.add_argument("--tolerance", type=float, default=0.01)
    rel.add_argument("--seed", type=int, default=0)
    rel.add_argument("--out", required=True, help="folder for release.json, release.md and the chosen model.pt")
    rel.add_argument("--write", action="store_true", help="also replace the bundle's models/model.pt")
    rel.set_defaults(func=_release)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.wait:
        os.environ["MEDHYBRID_WAIT_FOR_FOLDER"] = "1"  # read by every run folder's lock, in this process and its workers
    try:
        return int(args.func(args) or 0)
    except RunStopped as e:
        print(f"medhybrid: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        full = disk_full(e)  # a checkpoint or a mask that did not fit: the files written before it are intact
        cause = None if full else data_error(e)  # MONAI's Compose wraps a reader's error: report the file-level cause
        if full is None and cause is None:
            raise
        if cause is None:
            cause = full.strerror if isinstance(full, DiskFull) else (
                f"no space left on device writing {full.filename}: free some space and run the same command again")
        print(f"error: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
