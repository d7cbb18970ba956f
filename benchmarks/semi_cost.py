"""What semi-supervised fine-tuning costs per iteration: plain fine-tuning against each algorithm of
:mod:`medhybrid.engines.semi` on the same labelled subset, side by side, with the ratios to plain.

    .venv/bin/python benchmarks/semi_cost.py [--budgets 2 10] [--iterations 20] [--unlabelled-batch 8]

Each row is a real fine-tune (``medhybrid.workflows.finetune.run_finetuning``, from scratch on PH2 pool images, the quick
profile's U-Net at 64 px, MLflow off, on the CPU) timed by the engine's own ``trained N iterations in S s``. A
semi-supervised batch holds the labelled batch plus ``--unlabelled-batch`` pool images; mean teacher adds the
teacher's forward pass, FixMatch the forward pass that makes the pseudo-labels (both without gradients).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from finetune_cost import captured_log, quick_finetune_config

ALGORITHMS = ("none", "mean-teacher", "fixmatch", "denoise")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--unlabelled-batch", type=int, default=8)
    args = ap.parse_args()

    import torch

    from medhybrid.workflows.finetune import run_finetuning

    trained = captured_log()
    rows = []
    with tempfile.TemporaryDirectory(prefix="medhybrid-semicost-") as tmp:
        for b in args.budgets:
            for alg in ALGORITHMS:
                cfg = quick_finetune_config(b, str(Path(tmp) / f"b{b}-{alg}"), args.iterations)
                cfg = cfg.model_copy(update={"semi": cfg.semi.model_copy(
                    update={"algorithm": alg, "unlabelled_batch": args.unlabelled_batch})})
                trained.clear()
                run_finetuning(cfg)
                msg = next(m for m in trained if m.startswith("trained "))
                iters, seconds = int(msg.split()[1]), float(msg.split()[4])
                labelled = min(cfg.train.batch_size, max(2, b))
                images = labelled + (args.unlabelled_batch if alg != "none" else 0)
                rows.append((b, alg, labelled, images, iters, seconds / iters))
    print(f"semi-supervised fine-tuning cost per iteration (PH2, quick U-Net, 64 px, {torch.get_num_threads()} CPU threads)")
    print(f"{'budget':>6} {'algorithm':<13}{'labelled':>9}{'images':>7}{'iters':>6}{'s/iter':>9}{'x plain':>9}")
    plain = {b: s for b, alg, *_, s in rows if alg == "none"}
    for b, alg, labelled, images, iters, s in rows:
        print(f"{b:>6} {alg:<13}{labelled:>9}{images:>7}{iters:>6}{s:>9.3f}{s / plain[b]:>9.2f}")


if __name__ == "__main__":
    main()
