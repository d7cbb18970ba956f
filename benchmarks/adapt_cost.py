"""What ``medhybrid adapt`` costs: the shipped dermoscopy bundle adapted to k labelled PH2 pool images with N
unlabelled ones (the rest of the pool, then the same images again under other names when N is larger), timed as a whole
and per stage (scoring the start, the fold fine-tunes of each recipe, the final fine-tune), in one run.

    .venv/bin/python benchmarks/adapt_cost.py [--labels 5] [--unlabelled 100] [--out DIR]

The target is k = 5 with 100 unlabelled images in under 10 minutes on a 2-core CPU. Nothing of PH2's test split is
read. Prints one line per stage (seconds and share of the whole) and the decision.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def user_folder(root: Path, labels: int, unlabelled: int) -> Path:
    """``images/`` and ``masks/`` as a user would lay them out: ``labels`` pool images with masks, ``unlabelled``
    without (pool images, repeated under new names once the pool is used up)."""
    from medhybrid.data.datasets import load_pairs
    from medhybrid.data.specs import load_dataset_spec

    pool = sorted(load_pairs(load_dataset_spec("ph2"), "pool"), key=lambda p: p["id"])
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for p in pool[:labels]:
        shutil.copy(p["image"], root / "images" / f"{p['id']}.png")
        shutil.copy(p["label"], root / "masks" / f"{p['id']}.png")
    rest = pool[labels:]
    for n in range(unlabelled):
        p = rest[n % len(rest)]
        shutil.copy(p["image"], root / "images" / f"u{n:04d}-{p['id']}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=5)
    ap.add_argument("--unlabelled", type=int, default=100)
    ap.add_argument("--out", default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("overrides", nargs="*", help="adapt overrides, e.g. finetune.schedule.max_iterations=2 (a smoke)")
    args = ap.parse_args()

    from medhybrid.cli import main as cli

    stamps: list[tuple[float, str]] = []

    class Stages(logging.Handler):
        def emit(self, record):
            stamps.append((time.perf_counter(), record.getMessage()))

    logging.getLogger("medhybrid").addHandler(Stages())
    logging.getLogger("medhybrid").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        data = user_folder(work / "data", args.labels, args.unlabelled)
        out = work / "adapted"
        t0 = time.perf_counter()
        status = cli(["adapt", "--model", str(REPO / "bundles" / "dermoscopy_lesion_segmentation"), "--data", str(data),
                      "--output", str(out), "mlflow.enabled=false", "progress=false", *args.overrides])
        total = time.perf_counter() - t0
        if status:
            sys.exit(f"medhybrid adapt exited with {status}")
        report = json.loads((out / "report.json").read_text())
    # each "adapt:" log line ends a stage: the time since the line before is that stage's
    per: dict[str, float] = {}
    last = t0
    for t, m in ((t, m) for t, m in stamps if m.startswith("adapt:")):
        fold = re.match(r"adapt: fold \d+/\d+, (\S+)", m)
        stage = (f"folds: {fold.group(1)}" if fold else "score the start" if "the start scores" in m
                 else "decide" if m.startswith("adapt: decision") else "read the model and data")
        per[stage] = per.get(stage, 0.0) + (t - last)
        last = t
    per["final fine-tune and report"] = t0 + total - last
    print(f"adapt: {args.labels} labelled + {args.unlabelled} unlabelled images, menu {', '.join(report['recipes'])}: "
          f"{total:.1f} s in all ({total / 60:.2f} min; target under 10 min at 5 + 100)")
    for stage, s in per.items():
        print(f"  {stage:<30} {s:8.1f} s  {s / total:6.1%}")
    print(f"decision: {report['decision']} ({report['reason']})")


if __name__ == "__main__":
    main()
