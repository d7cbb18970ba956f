"""Bundle inference on camera-size photographs: the inference pipeline (reduced-size JPEG decoding, streaming, masks
mapped back to the full size) beside the previous pipeline (every pixel decoded and resized as float) and beside
Pillow decoding the same files fully, in one run.

    .venv/bin/python benchmarks/large_images.py [--images 100] [--previous 10] [--size 4000x3000] [--bundle ...]
    .venv/bin/python benchmarks/large_images.py --photos ../shared/data/dermoscopy/camera_photos/images --previous 0

The images: with ``--photos``, real camera photographs, taken in turn until there are ``--images`` of them (each a
link of its own name); otherwise made for the benchmark, shipped PH2 test images upscaled (bicubic) to ``--size`` and
saved as JPEG (quality 90), cached in ``--workdir``. Each pipeline runs the bundle's ``configs/inference.json`` in a process of its
own (``monai.bundle.run``), so its peak memory is its own; the previous pipeline is the same file with the overrides
that restore it (full decoding, a map-style dataset, sigmoid + float threshold, no quality report). Prints wall time
per image, the ratio to Pillow's full decode, peak RSS, and the Dice between the two pipelines' masks per image. The
new pipeline also runs on the first image alone, so the time per added image (start-up left out) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the inference.json of bundle version 1.1.0: every pixel decoded, a map-style dataset (a bad file stops the run),
# probabilities thresholded as float, no quality report
PREVIOUS = {
    "reduce_factor": 0,
    "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
        {"_target_": "medhybrid.data.transforms.SaveMask2Dd", "keys": "pred", "output_dir": "@output_dir",
         "dicom_seg": "@dicom_seg", "labels": "@labels"}]},
    "handlers": [
        {"_target_": "CheckpointLoader", "load_path": "$@model_dir + '/model.pt'", "load_dict": {"model": "@network"},
         "map_location": "@device", "strict": True},
        {"_target_": "StatsHandler", "iteration_log": False}],
    "run": ["$@evaluator.run()"],
}


def worker(bundle: Path, inputs: Path, out: Path, previous: bool, batch: int) -> None:
    """Run the bundle once in this process; print {"wall_s", "peak_rss_mb"} as JSON."""
    import torch
    from monai.bundle import run

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    overrides = dict(PREVIOUS) if previous else {}
    t = time.perf_counter()
    run(config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle), input_dir=str(inputs), output_dir=str(out), **{"dataloader#batch_size": batch},
        **overrides)
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def make_images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    from PIL import Image

    from medhybrid.data.datasets import load_pairs
    from medhybrid.data.specs import load_dataset_spec

    sources = [Path(p["image"]) for p in load_pairs(load_dataset_spec("ph2"), "test")]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        f = folder / f"camera_{i:03d}.jpg"
        if not f.is_file():
            with Image.open(sources[i % len(sources)]) as im:
                im.convert("RGB").resize(size, Image.BICUBIC).save(f, quality=90)
        files.append(f)
    return files


def take_photos(folder: Path, photos: Path, n: int) -> list[Path]:
    """``n`` links into ``folder`` to the photographs in ``photos``, taken in turn (sorted)."""
    found = sorted(f for f in photos.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not found:
        raise SystemExit(f"{photos}: no JPEG or PNG photographs")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        src = found[i % len(found)]
        f = folder / f"photo_{i:03d}_{src.name}"
        if not f.exists():
            os.link(src.resolve(), f)
        files.append(f)
    return files


def image_sizes(files: list[Path]) -> str:
    from PIL import Image

    sizes = []
    for f in files:
        with Image.open(f) as im:
            sizes.append(im.size)
    lo, hi = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    return f"{lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}"


def pillow_decode(files: list[Path]) -> float:
    from PIL import Image

    for f in files:  # the files in the page cache, as for the pipelines
        f.read_bytes()
    t = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            im.load()
    return time.perf_counter() - t


def mask_dice(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x, y = np.asarray(Image.open(a)) > 0, np.asarray(Image.open(b)) > 0
    if x.shape != y.shape:
        return float("nan")
    s = x.sum() + y.sum()
    return 1.0 if s == 0 else float(2 * (x & y).sum() / s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--size", default="4000x3000", help="WxH of the photographs")
    p.add_argument("--bundle", default="dermoscopy_lesion_segmentation")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--previous", type=int, default=10, help="images the previous pipeline runs on (it takes seconds per "
                   "image; its time per image and the mask comparison come from these; 0: not run)")
    p.add_argument("--photos", help="a folder of real photographs to use instead of upscaled PH2 images")
    p.add_argument("--workdir", help="where the photographs are cached (default: a temporary folder)")
    p.add_argument("--worker", choices=["new", "previous"], help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    bundle = REPO / "bundles" / args.bundle
    if args.worker:
        worker(bundle, Path(args.inputs), Path(args.out), args.worker == "previous", args.batch)
        return
    w, h = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        if args.photos:
            files = take_photos(root / "photos", Path(args.photos), args.images)
            what, tag = f"camera photographs ({image_sizes(files)}) from {args.photos}", "photos"
        else:
            files = make_images(root / f"photos_{w}x{h}", args.images, (w, h))
            what, tag = f"JPEG {w}x{h} (PH2 test images upscaled)", f"{w}x{h}"
        runs = {"new": files, "one": files[:1]}
        if args.previous > 0:
            runs["previous"] = files[: min(args.previous, len(files))]
        folders = {}
        for side, subset in runs.items():
            folders[side] = root / f"input_{tag}_{side}_{len(subset)}"
            folders[side].mkdir(parents=True, exist_ok=True)
            for f in subset:
                if not (folders[side] / f.name).exists():
                    os.link(f, folders[side] / f.name)
        decode = pillow_decode(files)
        n = len(files)
        print(f"large images: {n} {what}, bundle {args.bundle}, batch {args.batch}")
        print(f"Pillow full decode: {decode:.2f} s ({1000 * decode / n:.1f} ms/image)")
        res = {}
        for side in runs:
            out = root / f"masks_{tag}_{side}"
            cmd = [sys.executable, __file__, "--worker", "previous" if side == "previous" else "new", "--inputs",
                   str(folders[side]), "--out", str(out), "--bundle", args.bundle, "--batch", str(args.batch)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=bundle)
            if proc.returncode != 0:
                raise SystemExit(f"{side} pipeline failed:\n{proc.stderr[-3000:]}")
            res[side] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t,
                         "out": out, "n": len(runs[side])}
        per_decode = decode / n
        print(f"{'pipeline':<10} {'images':>7} {'wall s':>8} {'ms/image':>9} {'x decode':>9} {'peak RSS MB':>12}")
        for side in [s for s in ("previous", "one", "new") if s in res]:
            r = res[side]
            ms = 1000 * r["wall_s"] / r["n"]
            print(f"{side:<10} {r['n']:>7d} {r['wall_s']:>8.2f} {ms:>9.1f} {ms / (1000 * per_decode):>9.2f} "
                  f"{r['peak_rss_mb']:>12.0f}")
        added = 1000 * (res["new"]["wall_s"] - res["one"]["wall_s"]) / max(1, n - 1)
        print(f"new, per added image (start-up left out): {added:.1f} ms, {added / (1000 * per_decode):.2f} x decode")
        if "previous" in res:
            print(f"speed-up new/previous (per image): "
                  f"{(res['previous']['wall_s'] / res['previous']['n']) / (res['new']['wall_s'] / n):.2f}")
            both = files[: res["previous"]["n"]]
            dice = [mask_dice(res["previous"]["out"] / f"{f.stem}_mask.png", res["new"]["out"] / f"{f.stem}_mask.png")
                    for f in both]
            print(f"masks, Dice new vs previous on {len(both)} images: mean {sum(dice) / len(dice):.4f}, "
                  f"min {min(dice):.4f}, identical {sum(d == 1.0 for d in dice)} of {len(dice)}")
        ok_t = res["new"]["wall_s"] <= 5 * decode
        ok_a = added <= 5 * 1000 * per_decode
        ok_m = res["new"]["peak_rss_mb"] < 1024
        print(f"goals ({n} images): whole run <= 5x Pillow decode: {'met' if ok_t else 'NOT met'}; per added image "
              f"<= 5x: {'met' if ok_a else 'NOT met'}; peak RSS < 1 GB: {'met' if ok_m else 'NOT met'}")


if __name__ == "__main__":
    main()
