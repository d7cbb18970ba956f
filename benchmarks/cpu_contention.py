"""A fine-tune alone and beside a competing CPU-bound process, with a fixed thread team (before) and with
medhybrid's thread policy (``train.threads=auto``, :mod:`medhybrid.core.threads`; after), side by side in one run.

    .venv/bin/python benchmarks/cpu_contention.py [--budget 20] [--iters 100] [--competitors 1] [--late 0]

The run is a real few-shot fine-tune (``medhybrid.workflows.finetune.run_finetuning``, from scratch on ``--budget`` PH2 pool
images, the quick profile's U-Net, batch 8, ``--iters`` iterations), each in its own subprocess. The competitor is
``--competitors`` single-threaded busy loops (another user's job on a shared machine), started just before the run
(after the child's imports) or ``--late`` seconds into it, and stopped after it. "fixed" pins the team at all cores (PyTorch's default);
"auto" is the policy. The ratio beside/alone is what sharing the machine costs; taking ``k`` of ``n`` cores should
cost about n/(n-k).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(args) -> None:
    """One fine-tune in this process; prints its training seconds as JSON."""
    from finetune_cost import captured_log, quick_finetune_config

    from medhybrid.core.threads import cores_available
    from medhybrid.workflows.finetune import run_finetuning

    records = captured_log()
    cfg = quick_finetune_config(args.budget, args.out, args.iters,
                                threads=args.threads if args.threads == "auto" else int(args.threads))
    print("ready", flush=True)  # imports done: the parent starts the competitors now, then says go
    sys.stdin.readline()
    t = time.perf_counter()
    run_finetuning(cfg)
    seconds = time.perf_counter() - t
    changes = [m for m in records if "CPU thread(s)" in m]
    print(json.dumps({"seconds": seconds, "cores": cores_available(), "changes": changes}))


def run(args, threads: str, competitors: int, late: float, work: Path) -> dict:
    busy = []
    cmd = [sys.executable, __file__, "--child", "--threads", threads, "--budget", str(args.budget),
           "--iters", str(args.iters), "--out", str(work / f"{threads}-{competitors}-{time.time_ns()}")]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        # the competitors run while the fine-tune does, not while the child imports: started once it is ready (or
        # --late seconds after the run starts)
        if proc.stdout.readline().strip() != "ready":
            proc.wait()
            raise SystemExit(f"fine-tune failed before it started:\n{proc.stderr.read()[-3000:]}")
        def start_busy() -> list[subprocess.Popen]:
            return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]

        if competitors and not late:
            busy = start_busy()
            time.sleep(0.5)  # running before the run's thread policy looks at the machine
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if competitors and late:
            time.sleep(late)
            busy = start_busy()
        out, err = proc.communicate(timeout=3600)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    if proc.returncode:
        raise SystemExit(f"fine-tune failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--competitors", type=int, default=1, help="single-threaded busy processes beside the run")
    ap.add_argument("--late", type=float, default=0.0, help="start the competitors this many seconds into the run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    import torch

    n = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="medhybrid-contention-") as tmp:
        res = {(t, c): run(args, t, c, args.late, Path(tmp)) for t in (str(n), "auto") for c in (0, args.competitors)}
    cores = res[("auto", 0)]["cores"]
    print(f"fine-tune: {args.budget} PH2 images, {args.iters} iterations of 8, quick U-Net; {cores} cores, "
          f"{args.competitors} busy process(es) beside it" + (f" from {args.late:.0f} s in" if args.late else ""))
    print(f"{'threads':<10}{'alone s':>10}{'beside s':>10}{'beside/alone':>14}")
    for t, label in ((str(n), f"fixed {n}"), ("auto", "auto")):
        a, b = res[(t, 0)]["seconds"], res[(t, args.competitors)]["seconds"]
        print(f"{label:<10}{a:>10.1f}{b:>10.1f}{b / a:>14.2f}")
    ideal = cores / max(1, cores - args.competitors)
    fixed_b, auto_b = res[(str(n), args.competitors)]["seconds"], res[("auto", args.competitors)]["seconds"]
    print(f"slowdown beside: fixed {fixed_b / res[(str(n), 0)]['seconds']:.2f}, auto "
          f"{auto_b / res[('auto', 0)]['seconds']:.2f} (losing {args.competitors} of {cores} cores: {ideal:.2f})")
    print(f"speedup beside, auto over fixed {fixed_b / auto_b:.2f}")
    print(f"alone, auto/fixed {res[('auto', 0)]['seconds'] / res[(str(n), 0)]['seconds']:.2f}")
    for line in res[("auto", args.competitors)]["changes"]:
        print(f"  policy: {line}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
