"""The label-budget ablation run sequentially and on Ray, side by side in one run, plus what Ray adds per task.

    .venv/bin/python benchmarks/ray_ablation.py [--config dermoscopy] [--profile quick] [--workers 2] \
        [--set seeds=[0] ...] [--gpu-fraction 0]

Both runs are the same real ablation (``medhybrid ablate --config C --profile P`` with the ``--set`` overrides),
each in a fresh folder and its own subprocess, from nothing: pretrainings, fine-tunes, evaluation and the report.
The Ray run starts a local instance with ``--workers`` CPUs (one task per CPU; with ``--gpu-fraction`` each
fine-tune also takes that share of a GPU). Printed: wall seconds of each, their ratio, whether every run's test Dice
is the same (to 1e-3: a Ray task runs one thread per CPU it declares, the sequential runner a team of all cores, and
a different thread count changes floating-point sums), and Ray's overhead: starting the local instance, and the
round trip of an empty task carrying an ablation config (submit, schedule, run, return), median of ``--tasks`` (50;
0 leaves these two out, and with them a Ray instance of their own).
A run that fails is recorded by the ablation and does not stop it; both runners must fail the same runs. With
``--out`` the two run folders and the MLflow server's store (``mlflow-server.db``) are kept there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _echo(cfg):
    return cfg.name


def overhead(config: str, profile: str, sets: list[str], workers: int, n: int = 50) -> dict:
    """Seconds to start a local Ray instance and the median round trip of an empty task given the ablation config."""
    import ray

    from medhybrid.experiments.ablation import load_ablation

    cfg = load_ablation(config, profile, sets)
    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    start = time.perf_counter() - t
    try:
        task = ray.remote(_echo).options(num_cpus=1)
        ray.get(task.remote(cfg))  # the workers' first import
        trips = []
        for _ in range(n):
            t = time.perf_counter()
            ray.get(task.remote(cfg))
            trips.append(time.perf_counter() - t)
    finally:
        ray.shutdown()
    return {"ray_init_s": start, "task_round_trip_ms": 1000 * statistics.median(trips)}


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """A local ``mlflow server`` (SQLite behind it): Ray's worker processes write to it, never to one SQLite file."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow-server.db'}",
                             "--artifacts-destination", str(folder / "mlartifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit("mlflow server did not start")
        yield uri
    finally:
        proc.terminate()
        proc.wait(30)


def ablate(config: str, profile: str, sets: list[str], folder: Path, executor: str, workers: int, gpu: float,
           tracking_uri: str) -> tuple[float, list[str]]:
    """Wall seconds of ``medhybrid ablate`` and the runs it recorded as failed (exit 1 with its report written)."""
    extra = [f"name=bench-{executor}", f"output_dir={folder / executor}", f"mlflow.tracking_uri={tracking_uri}"]
    if executor == "ray":
        extra += ["executor=ray", f"ray.num_cpus={workers}", "ray.object_store_mb=512", f"ray.finetune.num_gpus={gpu}"]
    cmd = [sys.executable, "-m", "medhybrid.cli", "ablate", "--config", config, "--profile", profile, *sets, *extra]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    lines = res.stdout.splitlines()
    at = next((i for i, line in enumerate(lines) if "run(s) failed (see" in line), None)
    if res.returncode and not (res.returncode == 1 and at is not None):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    failed = [] if at is None else [line.strip().split(":")[0] for line in lines[at + 1 :] if line.startswith("  ")]
    return seconds, sorted(failed)


def results(folder: Path) -> dict[tuple, float]:
    """Test Dice per (method, budget, seed) from an ablation's report (``report/results.csv``)."""
    import csv

    with open(folder / "report" / "results.csv") as fh:
        return {(r["method"], r["budget"], r["seed"]): float(r["test_dice"]) for r in csv.DictReader(fh)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="dermoscopy")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu-fraction", type=float, default=0.0)
    ap.add_argument("--set", dest="sets", nargs="*", default=[], help="ablation overrides, e.g. 'seeds=[0]'")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument("--tasks", type=int, default=50,
                    help="empty tasks timed for the round trip (median); 0 leaves out Ray's start and round trip")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medhybrid-ray-bench-") as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        # --tasks 0: no separate Ray instance for the overhead figures (the ablations alone)
        over = overhead(args.config, args.profile, args.sets, args.workers, args.tasks) if args.tasks else {}
        with mlflow_server(folder) as uri:  # the same tracking for both runs
            seq, fail_seq = ablate(args.config, args.profile, args.sets, folder, "sequential", args.workers, args.gpu_fraction, uri)
            ray_s, fail_ray = ablate(args.config, args.profile, args.sets, folder, "ray", args.workers, args.gpu_fraction, uri)
        a, b = results(folder / "sequential"), results(folder / "ray")
        diff = max((abs(a[k] - b[k]) for k in a if k in b), default=0.0)
        same = sorted(a) == sorted(b) and diff <= 1e-3 and fail_seq == fail_ray
    figures = {"config": args.config, "profile": args.profile, "sets": args.sets, "workers": args.workers,
               "cores": os.cpu_count(), "sequential_s": round(seq, 1), "ray_s": round(ray_s, 1),
               "ray_vs_sequential": round(ray_s / seq, 3),
               **{k: round(v, 2) for k, v in over.items()}, "tasks": args.tasks, "runs": len(a),
               "max_dice_diff": diff, "failed_runs": {"sequential": fail_seq, "ray": fail_ray}, "same_results": same}
    print(f"ablation {args.config}/{args.profile} {' '.join(args.sets)}: sequential {seq:.0f} s, Ray with {args.workers} "
          f"workers {ray_s:.0f} s (ratio {ray_s / seq:.2f}); "
          + (f"Ray start {over['ray_init_s']:.1f} s, empty task round trip {over['task_round_trip_ms']:.1f} ms; "
             if over else "")
          + f"{len(a)} runs, largest test Dice difference {diff:.1e}"
          + (f"; failed runs: sequential {len(fail_seq)}, Ray {len(fail_ray)}" if fail_seq or fail_ray else ""))
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
