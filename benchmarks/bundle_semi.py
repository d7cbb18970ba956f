"""The bundles' semi-supervised recipe against labels-only training, as a site meets it: a dataset folder with a few
labelled images and the rest without masks (what MONAI Label's train task hands the bundle: the saved labels and the
unlabelled studies), scored on held-back labelled images that neither training sees.

    .venv/bin/python benchmarks/bundle_semi.py [--labels 5] [--heldout 30] [--unlabelled N] [--seeds 0 1 2]
                                               [--bundles dermoscopy chest]

For each bundle and seed: ``--labels`` pool images with masks and the pool's other images without (``--unlabelled``
of them, or all), less ``--heldout`` pool images kept aside with their masks (all drawn with the seed; the target's
test split is never read). The bundle's
``train.json`` runs twice from its ``pretrained.pt`` through ``python -m monai.bundle run``: with a semi-supervised
algorithm (``--algorithm``; by default the bundle's own ``semi_algorithm``, or ``fixmatch`` where the bundle ships
``none``) and with ``semi_algorithm=none``; ``evaluate.json`` then scores each on the held-back images at
native resolution. Prints mean Dice per arm and the paired difference per seed, and a JSON line of every figure.

``--arms A B`` compares two other arms, each a ``train.json`` run scored the same way: ``semi`` and ``labels-only``
(the default pair) keep the bundle's WiSE-FT weight (``wise``), ``semi-plain`` and ``plain`` set ``wise=1`` (the
trained weights alone), ``semi-wise`` and ``labels-only-wise`` set ``wise=0.75``. ``--arms labels-only-wise plain``
measures what WiSE-FT does for a site's retraining on the labels alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"dermoscopy": ("dermoscopy_lesion_segmentation", "ph2"), "chest": ("chest_xray_lung_segmentation", "openist")}
ARMS = {"semi": (True, None), "labels-only": (False, None), "semi-plain": (True, 1.0), "plain": (False, 1.0),
        "semi-wise": (True, 0.75), "labels-only-wise": (False, 0.75)}
"""arm: (semi-supervised, WiSE-FT weight; None = the bundle's own)"""


def site_folder(folder: Path, pairs: list[dict], labelled: set[str]) -> Path:
    """``images/`` with every pair's image, ``masks/<id>.png`` for the labelled ones only."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for p in pairs:
        shutil.copy(p["image"], folder / "images" / Path(p["image"]).name)
        if p["id"] in labelled:
            shutil.copy(p["label"], folder / "masks" / f"{Path(p['image']).stem}.png")
    return folder


def bundle_run(bundle: Path, configs: list[str], *args: str) -> float:
    files = "[" + ",".join(f"'configs/{c}.json'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--meta_file", "configs/metadata.json",
           "--logging_file", "configs/logging.conf", *args]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=5)
    ap.add_argument("--heldout", type=int, default=30)
    ap.add_argument("--unlabelled", type=int, help="unlabelled images in the site's folder (default: the rest of the pool)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=list(BUNDLES))
    ap.add_argument("--iterations", type=int, help="fixed training iterations (default: the bundle's schedule)")
    ap.add_argument("--algorithm", choices=["fixmatch", "mean-teacher", "denoise"],
                    help="the semi-supervised arm's algorithm (default: the bundle's semi_algorithm, fixmatch if none)")
    ap.add_argument("--arms", nargs=2, default=["semi", "labels-only"], choices=list(ARMS), metavar="ARM",
                    help=f"the two arms compared, first minus second (of {', '.join(ARMS)})")
    args = ap.parse_args()
    first, second = args.arms
    if first == second:
        ap.error(f"--arms: two different arms, not {first} twice")

    from medhybrid.data.datasets import few_shot_ids, load_pairs
    from medhybrid.data.specs import load_dataset_spec

    figures = []
    with tempfile.TemporaryDirectory(prefix="medhybrid-bundlesemi-") as tmp:
        for name in args.bundles:
            folder, dataset = BUNDLES[name]
            shipped = json.loads((REPO / "bundles" / folder / "configs" / "train.json").read_text())["semi_algorithm"]
            algorithm = args.algorithm or (shipped if shipped != "none" else "fixmatch")
            pool = sorted(load_pairs(load_dataset_spec(dataset), "pool"), key=lambda p: p["id"])
            for seed in args.seeds:
                order = few_shot_ids([p["id"] for p in pool], len(pool), seed)
                held, labelled = set(order[: args.heldout]), set(order[args.heldout : args.heldout + args.labels])
                rest = order[args.heldout + args.labels :]
                unlabelled = set(rest if args.unlabelled is None else rest[: args.unlabelled])
                work = Path(tmp) / f"{name}-s{seed}"
                site = site_folder(work / "site", [p for p in pool if p["id"] in labelled | unlabelled], labelled)
                heldout = site_folder(work / "heldout", [p for p in pool if p["id"] in held], held)
                row = {"bundle": name, "seed": seed, "labelled": len(labelled), "unlabelled": len(unlabelled),
                       "heldout": len(held)}
                for arm in args.arms:
                    semi, wise = ARMS[arm]
                    bundle = work / arm / folder
                    shutil.copytree(REPO / "bundles" / folder, bundle, ignore=shutil.ignore_patterns("eval", "runs"))
                    extra = ["--iterations", str(args.iterations)] if args.iterations else []
                    extra += ["--semi_algorithm", algorithm if semi else "none"]
                    extra += [] if wise is None else ["--wise", str(wise)]
                    row[f"{arm}_train_s"] = bundle_run(bundle, ["train"], "--dataset_dir", str(site), "--adapt", "False", *extra)
                    out = work / arm / "eval"
                    bundle_run(bundle, ["train", "evaluate"], "--dataset_dir", str(heldout), "--eval_split", "none",
                               "--output_dir", str(out))
                    metrics = {r[0]: float(r[1]) for r in csv.reader(open(out / "metrics.csv"))}
                    row[f"{arm}_dice"] = metrics["val_mean_dice"]
                if any(ARMS[a][0] for a in args.arms):
                    row["algorithm"] = algorithm
                figures.append(row)
                shown = {a: f"{a} ({algorithm})" if ARMS[a][0] else a for a in args.arms}
                print(f"{name} seed {seed}: {row['labelled']} labelled, {row['unlabelled']} unlabelled, {row['heldout']} "
                      f"held out: " + ", ".join(f"{shown[a]} {row[f'{a}_dice']:.4f} ({row[f'{a}_train_s']:.0f} s)"
                                                for a in args.arms)
                      + f", difference {row[f'{first}_dice'] - row[f'{second}_dice']:+.4f}", flush=True)
    for name in args.bundles:
        rows = [r for r in figures if r["bundle"] == name]
        diff = [r[f"{first}_dice"] - r[f"{second}_dice"] for r in rows]
        print(f"{name}: mean held-out Dice " + ", ".join(f"{a} {sum(r[f'{a}_dice'] for r in rows) / len(rows):.4f}"
                                                         for a in args.arms)
              + f", mean paired difference ({first} - {second}) {sum(diff) / len(diff):+.4f} over {len(rows)} seeds "
              f"({sum(d > 0 for d in diff)} of {len(rows)} positive)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
