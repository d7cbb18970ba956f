"""Pretraining throughput and peak memory: medhybrid's engine (MONAI SupervisedTrainer + seams)
side by side with a plain PyTorch loop on the same network, batch and objective, in one run.

    .venv/bin/python benchmarks/pretrain_throughput.py [--iters 20] [--batch 16] [--res 64] [--mode hybrid] [--compile]

``--mode`` is a pretraining mode (hybrid, supervised, diffusion, mdm) or ``finetune`` (the few-shot
fine-tuning step: clean image at sigma_min, mask loss only).

Each variant runs in its own subprocess (so peak memory is its own): peak RSS on CPU, peak
``torch.cuda.max_memory_allocated`` on CUDA. Prints images/s, peak memory and engine/plain ratios.
``--compile`` adds both loops under ``torch.compile`` (the engine through ``TrainConfig.compile``), each
with a fresh inductor cache, and prints the warm-up time (the first iterations, compilation included)
and the compiled/eager ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    def __init__(self):
        self.peak, self._stop = _rss_mb(), False
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.005)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self._stop = True
        self.t.join()


def plain_step(net, forward, opt, prepare, loss_fn, batch: dict, step: int, device, amp: bool, grad_clip: float | None) -> None:
    """One step of a plain PyTorch loop: corrupt the batch (medhybrid's prepare-batch at ``step``), forward (``forward``:
    ``net`` or its compiled form; bf16 autocast with ``amp``), loss, backward, gradient clipping, optimiser step."""
    import torch

    prepare.step = step
    x, target, _, kw = prepare(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = loss_fn(forward(x, **kw), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()


def _batch(args):
    import torch

    from medhybrid.data.datasets import load_pairs
    from medhybrid.data.specs import Preprocess, load_dataset_spec
    from medhybrid.data.transforms import preprocessing

    spec = load_dataset_spec("isic2018")
    pairs = load_pairs(spec, "train")[: args.batch]
    t = preprocessing(spec, Preprocess(resolution=args.res))
    items = [t(p) for p in pairs]
    return spec, [{"image": torch.as_tensor(d["image"]).as_subclass(torch.Tensor),
                   "label": torch.as_tensor(d["label"]).as_subclass(torch.Tensor)} for d in items]


def run_variant(args) -> dict:
    import torch

    from medhybrid.engines.batches import CorruptionPrepareBatch, SegmentationPrepareBatch
    from medhybrid.engines.fit import TrainConfig, fit
    from medhybrid.engines.losses import FinetuneLoss, PretrainLoss
    from medhybrid.networks.nets import ModelConfig, build_network

    torch.manual_seed(0)
    spec, items = _batch(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = build_network(ModelConfig(), spec.channels, 2)
    if args.mode == "finetune":  # the clean image at sigma_min and the mask loss, as medhybrid.workflows.finetune trains
        prepare, loss_fn = SegmentationPrepareBatch(), FinetuneLoss(net.image_channels, net.mask_channels)
    else:
        prepare = CorruptionPrepareBatch(args.mode, seed=0, seg_fraction=0.5, weighting="low")
        loss_fn = PretrainLoss(args.mode, net.mask_channels)
    warm = 3
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        if args.variant == "engine":
            cfg = TrainConfig(epochs=1, epoch_length=args.iters + warm, batch_size=args.batch, warmup_iterations=0,
                              check_data=False, progress=False, checkpoint_every=10**6, compile=args.compile)
            times = []

            def on_trainer(trainer):
                from ignite.engine import Events

                trainer.add_event_handler(Events.STARTED, lambda e: times.append(time.perf_counter()))
                trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: times.append(time.perf_counter()))

            with tempfile.TemporaryDirectory() as tmp:
                fit(net, items, prepare, loss_fn, cfg, tmp, on_trainer=on_trainer)
            elapsed = times[-1] - times[warm]
            warmup = times[warm] - times[0]
        else:
            net = net.to(device)
            amp = device.type == "cuda"
            if amp:
                net = net.to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(net.parameters(), lr=2e-4)
            forward = torch.compile(net) if args.compile else net
            batch = {"image": torch.stack([d["image"] for d in items]), "label": torch.stack([d["label"] for d in items])}
            start = time.perf_counter()
            for i in range(args.iters + warm):
                if i == warm:
                    if amp:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    warmup = t0 - start
                plain_step(net, forward, opt, prepare, loss_fn, batch, i + 1, device, amp, 1.0)
            if amp:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else mem.peak
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return {"variant": args.variant, "device": f"{device} ({name}), torch {torch.__version__}",
            "images_per_s": args.iters * args.batch / elapsed, "timed_s": elapsed, "warmup_s": warmup, "peak_mb": peak,
            "peak_kind": "cuda allocated" if device.type == "cuda" else "process RSS"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--mode", default="hybrid")
    p.add_argument("--compile", action="store_true", help="also run both loops under torch.compile")
    p.add_argument("--variant", choices=["engine", "plain"])
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)))
        return
    res = {}
    for compiled in (False, True) if args.compile else (False,):
        for v in ("plain", "engine"):
            cmd = [sys.executable, __file__, "--variant", v, "--iters", str(args.iters), "--batch", str(args.batch),
                   "--res", str(args.res), "--mode", args.mode] + (["--compile"] if compiled else [])
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache:  # a cold compile, every run, removed after
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            if out.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
            res[v + ("+compile" if compiled else "")] = json.loads(
                next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    e, pl = res["engine"], res["plain"]
    stage = "fine-tuning" if args.mode == "finetune" else f"pretraining ({args.mode})"
    print(f"{stage}, batch {args.batch}, {args.res} px, {args.iters} timed iterations, on {e['device']}")
    print(f"{'':15s} {'images/s':>10s} {'peak MB':>10s} {'warm-up s':>10s} {'timed s':>10s}  (peak: {e['peak_kind']}; "
          "warm-up: first 3 iterations, compilation included; timed: the timed iterations)")
    for v, r in res.items():
        print(f"{v:15s} {r['images_per_s']:10.1f} {r['peak_mb']:10.0f} {r['warmup_s']:10.1f} {r['timed_s']:10.4f}")

    def ratio(a: dict, b: dict) -> str:
        return f"throughput {a['images_per_s'] / b['images_per_s']:.3f}, peak memory {a['peak_mb'] / b['peak_mb']:.3f}"

    print(f"ratio engine/plain: {ratio(e, pl)}")
    if args.compile:
        print(f"ratio engine+compile/plain+compile: {ratio(res['engine+compile'], res['plain+compile'])}")
        print(f"ratio compiled/eager: plain {ratio(res['plain+compile'], pl)}; engine {ratio(res['engine+compile'], e)}")


if __name__ == "__main__":
    main()
