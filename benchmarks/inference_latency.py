"""Inference latency per image: ``medhybrid.workflows.inference.infer_files`` (read, preprocess, predict, restore the
native size, write the PNG mask; then also with its quality CSV) side by side with a plain PyTorch loop doing the same
steps by hand, on the same network and the same real PH2 test images, in one run.

    .venv/bin/python benchmarks/inference_latency.py [--images 16] [--res 64] [--batch 8]

The network is the quick profile's U-Net with random weights (latency does not depend on the weights).
Prints ms per image for both, peak RSS (CPU) or peak CUDA memory, and the ratio medhybrid/plain.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain_throughput import PeakRSS  # noqa: E402


def main() -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from medhybrid.data.datasets import load_pairs
    from medhybrid.data.specs import Preprocess, load_dataset_spec
    from medhybrid.networks.checkpoints import network_meta, save_model
    from medhybrid.networks.nets import ModelConfig, build_network
    from medhybrid.workflows.inference import infer_files

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()

    spec = load_dataset_spec("ph2")
    files = [Path(q["image"]) for q in load_pairs(spec, "test")[: args.images]]
    model_cfg = ModelConfig(channels=(32, 64, 64), attention_levels=(False, False, False))
    torch.manual_seed(0)
    net = build_network(model_cfg, 3, 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model = save_model(net, network_meta(net, model_cfg, Preprocess(resolution=args.res, aspect="stretch"), spec, "none"),
                           Path(tmp) / "model.pt")
        infer_files(model, files[:2], Path(tmp) / "warm", batch_size=args.batch, device=str(device))  # warm-up
        with PeakRSS() as mem_m:  # the same work as the plain loop: masks only
            t0 = time.perf_counter()
            infer_files(model, files, Path(tmp) / "medhybrid", batch_size=args.batch, device=str(device), quality=False)
            t_m = time.perf_counter() - t0
        with PeakRSS() as mem_q:  # and with the quality CSV (uncertainty: 4 more network passes per image)
            t0 = time.perf_counter()
            infer_files(model, files, Path(tmp) / "quality", batch_size=args.batch, device=str(device))
            t_q = time.perf_counter() - t0

        # the plain loop: PIL -> [-1, 1] -> stretch to res -> segment -> back to native size -> PNG
        net = net.to(device).eval()
        out = Path(tmp) / "plain"
        out.mkdir()
        with PeakRSS() as mem_p, torch.no_grad():
            t0 = time.perf_counter()
            for s in range(0, len(files), args.batch):
                chunk = files[s : s + args.batch]
                arrs = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in chunk]
                x = torch.stack([F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1, size=(args.res, args.res),
                                               mode="bilinear", align_corners=False)[0] for a in arrs]).to(device)
                logits = net.segment(x).float().cpu()
                for f, a, lg in zip(chunk, arrs, logits, strict=True):
                    full = F.interpolate(lg[None], size=a.shape[:2], mode="bilinear", align_corners=False)[0, 0]
                    Image.fromarray(((full > 0).numpy() * 255).astype(np.uint8)).save(out / f"{f.stem}_mask.png")
            t_p = time.perf_counter() - t0
    n = len(files)
    print(f"inference latency, {n} PH2 test images (native ~{Image.open(files[0]).size}), {args.res} px, batch {args.batch}, on {device}")
    print(f"{'':10s} {'ms/image':>10s} {'peak RSS MB':>12s}")
    print(f"{'plain':10s} {1000 * t_p / n:10.1f} {mem_p.peak:12.0f}")
    print(f"{'medhybrid':10s} {1000 * t_m / n:10.1f} {mem_m.peak:12.0f}")
    print(f"{'+quality':10s} {1000 * t_q / n:10.1f} {mem_q.peak:12.0f}")
    print(f"ratio medhybrid/plain: latency {t_m / t_p:.3f}; with the quality CSV {t_q / t_p:.3f}")


if __name__ == "__main__":
    main()
