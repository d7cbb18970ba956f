"""Pretraining on a large unlabelled set: images held in memory against the on-disk cache of preprocessed arrays,
on the shipped set and on a set ``--repeat`` times larger, side by side in one run.

    .venv/bin/python benchmarks/unlabelled_scale.py [--repeat 10] [--images 0] [--iters 50] [--batch 16] [--res 64]

The unlabelled set is a folder of the shipped ISIC 2018 images (train and val, ``--images`` of them, 0 = all 2594),
and the large one the same images linked ``--repeat`` times under different paths, so every copy is its own file to
find, decode and cache. Each variant pretrains ``diffusion`` from the unlabelled images alone
(``medhybrid.workflows.pretrain.run_pretraining``, the quick profile's U-Net) in its own subprocess and reports:

- setup: finding the files, reading their headers (grey or RGB), building the dataset (decoding every image for the
  in-memory cache; nothing for the disk cache, which decodes on first use);
- training images/s over ``--iters`` iterations of ``--batch`` (random draws over the whole set; with the cold disk
  cache each first draw of an image decodes and writes it, with the warm cache every draw is a read);
- peak resident memory of the process, and the size of the disk cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def build_set(folder: Path, images: int, repeat: int) -> int:
    """``folder/r<k>/<name>`` links to the shipped ISIC images, ``repeat`` copies; returns the number of files."""
    from medhybrid.data.datasets import load_pairs
    from medhybrid.data.specs import load_dataset_spec

    pairs = load_pairs(load_dataset_spec("isic2018"))[: images or None]
    for k in range(repeat):
        sub = folder / f"r{k}"
        sub.mkdir(parents=True, exist_ok=True)
        for p in pairs:
            link = sub / Path(p["image"]).name
            if not link.exists():
                link.symlink_to(p["image"])
    return len(pairs) * repeat


def run_variant(args) -> dict:
    """One variant in this process: setup, then pretraining, under a peak-RSS monitor."""
    sys.path.insert(0, str(HERE))
    import torch
    from pretrain_throughput import PeakRSS

    from medhybrid.core.config import load_config
    from medhybrid.workflows.pretrain import PretrainConfig, run_pretraining, training_data

    torch.manual_seed(0)
    out = Path(args.work) / f"run-{args.name}"
    overrides = [
        "mode=diffusion", "dataset=null", f"unlabelled.sources=[{args.folder}]", f"unlabelled.cache={args.cache}",
        f"unlabelled.cache_dir={args.cache_dir}", f"output_dir={out}", f"preprocess.resolution={args.res}",
        "model.channels=[32,64,64]", "model.attention_levels=[false,false,false]", "model.num_res_blocks=1",
        "train.epochs=1", f"train.epoch_length={args.iters}", f"train.batch_size={args.batch}", "train.val_max_images=8",
        "train.check_data=false", "train.progress=false", "train.device=cpu", "mlflow.enabled=false",
    ]
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        cfg = load_config(PretrainConfig, None, overrides)  # finds the files and reads their headers
        train_ds, _, _ = training_data(cfg)  # decodes every image (memory) or nothing (disk)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_pretraining(cfg)
        train = time.perf_counter() - t1
    return {"name": args.name, "images": len(train_ds), "setup_s": setup, "train_s": train,
            "images_per_s": args.iters * args.batch / train, "peak_rss_mb": rss.peak}


def _du_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20 if folder.is_dir() else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--images", type=int, default=0, help="ISIC images in the 1x set (0: all 2594)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    with tempfile.TemporaryDirectory(prefix="medhybrid-unlabelled-") as tmp:
        work = Path(tmp)
        small, large = work / "set-1x", work / f"set-{args.repeat}x"
        n_small, n_large = build_set(small, args.images, 1), build_set(large, args.images, args.repeat)
        cache = work / "cache"
        variants = [("memory-1x", small, "memory"), (f"memory-{args.repeat}x", large, "memory"),
                    (f"disk-{args.repeat}x-cold", large, "disk"), (f"disk-{args.repeat}x-warm", large, "disk")]
        results = []
        for name, folder, mode in variants:
            cmd = [sys.executable, __file__, "--variant", "1", "--name", name, "--folder", str(folder), "--cache", mode,
                   "--cache-dir", str(cache), "--work", str(work), "--iters", str(args.iters), "--batch", str(args.batch),
                   "--res", str(args.res)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                sys.exit(f"variant {name} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        import torch

        print(f"unlabelled pretraining (diffusion, {args.res} px, batch {args.batch}, {args.iters} iterations), "
              f"{n_small} and {n_large} ISIC images, {torch.get_num_threads()} threads")
        print(f"{'variant':<16} {'images':>7} {'setup_s':>8} {'train_s':>8} {'images/s':>9} {'peak_rss_mb':>12}")
        for r in results:
            print(f"{r['name']:<16} {r['images']:>7} {r['setup_s']:>8.1f} {r['train_s']:>8.1f} {r['images_per_s']:>9.1f} "
                  f"{r['peak_rss_mb']:>12.0f}")
        print(f"disk cache: {_du_mb(cache):.1f} MB for the images drawn")
        by = {r["name"]: r for r in results}
        m1, m10 = by["memory-1x"], by[f"memory-{args.repeat}x"]
        cold, warm = by[f"disk-{args.repeat}x-cold"], by[f"disk-{args.repeat}x-warm"]
        print(f"peak memory memory-{args.repeat}x/memory-1x {m10['peak_rss_mb'] / m1['peak_rss_mb']:.2f}")
        print(f"peak memory disk-{args.repeat}x/memory-{args.repeat}x {warm['peak_rss_mb'] / m10['peak_rss_mb']:.2f}")
        print(f"peak memory disk-{args.repeat}x/memory-1x {warm['peak_rss_mb'] / m1['peak_rss_mb']:.2f}")
        print(f"throughput disk-warm/memory {warm['images_per_s'] / m10['images_per_s']:.2f}")
        print(f"throughput disk-cold/memory {cold['images_per_s'] / m10['images_per_s']:.2f}")
        print(f"setup disk/memory at {args.repeat}x {warm['setup_s'] / m10['setup_s']:.2f}")


if __name__ == "__main__":
    main()
