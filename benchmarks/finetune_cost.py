"""Where a few-shot fine-tune's time goes as the label budget grows: the data path (cached, augmented samples into
batches) against the training step, per iteration and per image, side by side for each budget in one run.

    .venv/bin/python benchmarks/finetune_cost.py [--budgets 2 5 20] [--batches 50]

Each budget is a real fine-tune (``medhybrid.workflows.finetune.run_finetuning``, from scratch on PH2 pool images, the quick
profile's U-Net and schedule), timed as a whole, and its data path is timed alone: the same cached dataset,
augmentation and sampler, ``--batches`` batches drawn without a network. The fine-tune's batch is
``min(train.batch_size, max(2, budget))``: a subset of 2 images is not drawn 4 times into a batch of 8.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path


def captured_log() -> list[str]:
    """The messages the ``medhybrid`` logger emits from now on (INFO and up), collected in a list."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("medhybrid").addHandler(handler)
    logging.getLogger("medhybrid").setLevel(logging.INFO)
    return records


def quick_finetune_config(budget: int, out: str, iterations: int | None = None, **train):
    """A fine-tune from scratch on ``budget`` PH2 pool images with the quick profile's U-Net and schedule
    (``iterations`` fixed if given), MLflow off, on the CPU; ``train`` overrides the quick training settings."""
    from medhybrid.data.specs import load_dataset_spec
    from medhybrid.workflows.finetune import FinetuneConfig

    return FinetuneConfig(
        dataset=load_dataset_spec("ph2").model_dump(), method="scratch", budget=budget, seed=0, output_dir=out,
        mlflow={"enabled": False}, preprocess={"resolution": 64},
        model={"channels": [32, 64, 64], "attention_levels": [False, False, False], "num_res_blocks": 1},
        schedule={"per_label": 10, "min_iterations": iterations or 60, "max_iterations": iterations or 100, "epochs": 2},
        train={"batch_size": 8, "lr": 2e-4, "warmup_iterations": 10, "check_data": False, "progress": False,
               "device": "cpu", **train})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[2, 5, 20])
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iterations", type=int, help="fixed iterations per fine-tune (default: the quick schedule's)")
    args = ap.parse_args()

    import torch

    from medhybrid.data.datasets import few_shot_pairs
    from medhybrid.engines.batches import EpochSeededSampler
    from medhybrid.workflows.finetune import run_finetuning, training_dataset

    trained = captured_log()
    rows = []
    with tempfile.TemporaryDirectory(prefix="medhybrid-ftcost-") as tmp:
        for b in args.budgets:
            cfg = quick_finetune_config(b, str(Path(tmp) / f"b{b}"), args.iterations, batch_size=args.batch_size)
            batch = min(args.batch_size, max(2, b))
            pairs = few_shot_pairs(cfg.dataset, b, 0)
            ds, aug = training_dataset(cfg, pairs)
            if aug is not None:
                aug.set_random_state(seed=0)
            sampler = EpochSeededSampler(len(ds), args.batches * batch, seed=0)
            loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True)
            t = time.perf_counter()
            n = sum(1 for _ in loader)
            data_s = (time.perf_counter() - t) / n
            trained.clear()
            run_finetuning(cfg)
            msg = next(m for m in trained if m.startswith("trained "))
            iters, seconds = int(msg.split()[1]), float(msg.split()[4])
            rows.append((b, batch, iters, seconds / iters, data_s))
    print(f"fine-tune cost by budget (PH2, quick U-Net, train.batch_size {args.batch_size}, "
          f"{torch.get_num_threads()} CPU threads)")
    print(f"{'budget':>6}{'batch':>6}{'iters':>6}{'s/iter':>9}{'data s/iter':>13}{'data share':>12}{'ms/image':>10}")
    for b, batch, iters, it_s, data_s in rows:
        print(f"{b:>6}{batch:>6}{iters:>6}{it_s:>9.3f}{data_s:>13.4f}{data_s / it_s:>12.1%}{1000 * it_s / batch:>10.1f}")
    first, last = rows[0], rows[-1]
    print(f"s/iter ratio budget {last[0]}/{first[0]} {last[3] / first[3]:.2f}; batch ratio {last[1] / first[1]:.2f}; "
          f"per-image ratio {(last[3] / last[1]) / (first[3] / first[1]):.2f}")


if __name__ == "__main__":
    main()
