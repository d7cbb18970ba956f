"""Pretraining throughput and peak memory of medhybrid's engine at an ablation profile's network, resolution and batch
(by default the ``full`` profile's), in fp32, then bf16 autocast with channels-last, then that under ``torch.compile``,
side by side in one run, with the ratios to fp32.

    .venv/bin/python benchmarks/precision_throughput.py [--config dermoscopy] [--profile full] [--iters 30]
        [--mode hybrid] [--no-compile] [--set pretrain.train.batch_size=8 ...]

Each variant runs in its own subprocess (peak memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU, peak
RSS on a CPU) and trains the real source images of the profile's dataset through :func:`medhybrid.engines.fit.fit`
(``train.amp`` and ``train.compile``). bf16 autocast and channels-last are CUDA paths: on a CPU the first two variants
are the same computation. Warm-up (the first 3 iterations, compilation included) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pretrain_throughput import PeakRSS  # noqa: E402

VARIANTS = {"fp32": {"amp": False, "compile": False}, "bf16+channels-last": {"amp": True, "compile": False},
            "bf16+channels-last+compile": {"amp": True, "compile": True}}
WARM = 3


def run_variant(args) -> dict:
    import torch
    from ignite.engine import Events

    from medhybrid.data.datasets import load_pairs
    from medhybrid.data.transforms import preprocessing
    from medhybrid.engines.batches import CorruptionPrepareBatch
    from medhybrid.engines.fit import fit
    from medhybrid.engines.losses import PretrainLoss
    from medhybrid.experiments.ablation import load_ablation, pretrain_config
    from medhybrid.networks.nets import build_network

    abl = load_ablation(args.config, args.profile, args.sets)
    cfg = pretrain_config(abl, next(m for m, s in abl.methods.items() if s.pretrain == args.mode))
    torch.manual_seed(0)
    t = preprocessing(cfg.dataset, cfg.preprocess)
    items = [t(p) for p in load_pairs(cfg.dataset, "train")[: cfg.train.batch_size * 2]]
    items = [{"image": torch.as_tensor(d["image"]).as_subclass(torch.Tensor),
              "label": torch.as_tensor(d["label"]).as_subclass(torch.Tensor)} for d in items]
    net = build_network(cfg.model, cfg.channels, cfg.classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    v = VARIANTS[args.variant]
    train = cfg.train.model_copy(update={"epochs": 1, "epoch_length": args.iters + WARM, "warmup_iterations": 0,
                                         "check_data": False, "progress": False, "checkpoint_every": 10**6,
                                         "val_every": 10**6, "ema_decay": None, "num_workers": 0, "device": "auto", **v})
    times: list[float] = []

    def on_trainer(trainer):
        def stamp(_):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        trainer.add_event_handler(Events.STARTED, stamp)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prepare = CorruptionPrepareBatch(cfg.mode, seed=0, seg_fraction=cfg.hybrid.seg_fraction, weighting="low")
    with PeakRSS() as mem, tempfile.TemporaryDirectory() as tmp:
        fit(net, items, prepare, PretrainLoss(cfg.mode, net.mask_channels), train, tmp, on_trainer=on_trainer)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else mem.peak
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return {"variant": args.variant, "device": f"{device} ({name}), torch {torch.__version__}",
            "resolution": cfg.preprocess.resolution, "batch": train.batch_size, "channels": list(cfg.model.channels),
            "images_per_s": args.iters * train.batch_size / (times[-1] - times[WARM]), "timed_s": times[-1] - times[WARM],
            "warmup_s": times[WARM] - times[0], "peak_mb": peak,
            "peak_kind": "cuda allocated" if device.type == "cuda" else "process RSS"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="dermoscopy")
    p.add_argument("--profile", default="full")
    p.add_argument("--mode", default="hybrid", help="the pretraining mode whose method's settings are measured")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    p.add_argument("--set", dest="sets", nargs="*", default=[], help="ablation overrides, e.g. pretrain.train.batch_size=8")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--variant", choices=list(VARIANTS))
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)))
        return
    res = {}
    for v in VARIANTS:
        if args.no_compile and VARIANTS[v]["compile"]:
            continue
        cmd = [sys.executable, __file__, "--variant", v, "--config", args.config, "--profile", args.profile, "--mode",
               args.mode, "--iters", str(args.iters), "--set", *args.sets]
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:  # a cold compile, removed after
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        if out.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        res[v] = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    f = res["fp32"]
    print(f"pretraining ({args.mode}) at the {args.config}/{args.profile} profile: {f['resolution']} px, batch {f['batch']}, "
          f"U-Net channels {f['channels']}, {args.iters} timed iterations, on {f['device']}")
    print(f"{'':28s} {'images/s':>10s} {'peak MB':>10s} {'warm-up s':>10s} {'timed s':>10s}  (peak: {f['peak_kind']})")
    for v, r in res.items():
        print(f"{v:28s} {r['images_per_s']:10.1f} {r['peak_mb']:10.0f} {r['warmup_s']:10.1f} {r['timed_s']:10.4f}")
    for v, r in res.items():
        if v != "fp32":
            print(f"ratio {v}/fp32: throughput {r['images_per_s'] / f['images_per_s']:.3f}, "
                  f"peak memory {r['peak_mb'] / f['peak_mb']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
