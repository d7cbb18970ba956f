"""benchmarks/: each script runs at small sizes on the CPU and prints medhybrid's figures beside a plain
PyTorch loop's, with their ratio (the figures themselves are recorded in benchmarks/README.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks"


def _run(script: str, *args: str, env: dict | None = None) -> str:
    import os

    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _ratio(text: str, name: str) -> float:
    m = re.search(rf"{name} ([0-9.]+)", text)
    assert m, text
    return float(m.group(1))


@pytest.mark.parametrize("mode", ["hybrid", "finetune"])
def test_training_throughput_side_by_side(data, mode):
    out = _run("pretrain_throughput.py", "--iters", "2", "--batch", "2", "--res", "32", "--mode", mode)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("plain ", "engine "))}
    assert set(rows) == {"plain", "engine"} and all(float(v[0]) > 0 and float(v[1]) > 0 for v in rows.values())
    assert _ratio(out, "throughput") > 0 and _ratio(out, "peak memory") > 0


def test_inference_latency_side_by_side(data):
    out = _run("inference_latency.py", "--images", "3", "--res", "32", "--batch", "2")
    assert "3 PH2 test images" in out
    ms = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith(("plain ", "medhybrid "))}
    assert set(ms) == {"plain", "medhybrid"} and all(v > 0 for v in ms.values())
    assert _ratio(out, "latency") == pytest.approx(ms["medhybrid"] / ms["plain"], rel=0.01)


def test_ablation_time_side_by_side(data, tmp_path):
    """A tiny ablation on real ISIC -> PH2 images: the tool and the plain script train the same methods
    (the ddpm-features head left out of both), both score the test images, and the ratio is printed."""
    import yaml
    from conftest import isic_yaml, ph2_yaml

    cpu = {"device": "cpu", "progress": False}
    config = {
        "source": str(isic_yaml(tmp_path / "datasets", n_train=8, n_val=2)),
        "target": str(ph2_yaml(tmp_path / "datasets", n_pool=4, n_test=3)),
        "methods": {"scratch": {"pretrain": "none"}, "hybrid": {"pretrain": "hybrid"},
                    "ddpm-features": {"pretrain": "hybrid", "head": "ddpm-features"}},
        "reference": "hybrid",
        "pretrain": {"preprocess": {"resolution": 32},
                     "model": {"channels": [16, 32], "attention_levels": [False, False]},
                     "train": {"epochs": 1, "epoch_length": 3, "batch_size": 4, "warmup_iterations": 0, "val_max_images": 2, **cpu}},
        "finetune": {"train": {"batch_size": 2, "warmup_iterations": 0, **cpu},
                     "schedule": {"per_label": 1, "min_iterations": 3, "max_iterations": 3, "epochs": 1}},
        "profiles": {"tiny": {"budgets": [2], "seeds": [0, 1]}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = _run("ablation_time.py", "--config", str(path), "--profile", "tiny")
    assert "2 methods x 1 budgets x 2 seeds" in out, out
    rows = {tuple(line.split()[:2]): [float(v) for v in line.split()[2:]] for line in out.splitlines()
            if line.split()[:1] in (["scratch"], ["hybrid"])}
    assert set(rows) == {(m, s) for m in ("scratch", "hybrid") for s in ("plain", "medhybrid")}, out
    for (method, _), (pretrain_s, train_s, eval_s, dice) in rows.items():
        assert train_s > 0 and eval_s > 0 and 0 < dice <= 1 and (pretrain_s > 0 or method == "scratch")
    assert "ddpm-features" not in out
    assert _ratio(out, "wall") > 0


def test_unlabelled_scale_memory_against_disk_cache(data):
    out = _run("unlabelled_scale.py", "--repeat", "3", "--images", "12", "--iters", "2", "--batch", "4", "--res", "32")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("memory-", "disk-"))}
    assert set(rows) == {"memory-1x", "memory-3x", "disk-3x-cold", "disk-3x-warm"}
    assert [int(v[0]) for v in rows.values()] == [12, 36, 36, 36]  # every linked copy is its own image
    assert all(float(v[3]) > 0 and float(v[4]) > 0 for v in rows.values())
    assert float(re.search(r"disk cache: ([0-9.]+) MB", out).group(1)) > 0
    for name in ("throughput disk-warm/memory", "peak memory disk-3x/memory-3x", "setup disk/memory at 3x"):
        assert _ratio(out, name) > 0


def test_cpu_contention_alone_and_beside_a_busy_process(data):
    """Both thread settings run alone and beside a busy process; on two cores the policy gives one up to it."""
    out = _run("cpu_contention.py", "--budget", "2", "--iters", "6", env={"OMP_NUM_THREADS": "2"})
    rows = {line.split()[0]: [float(v) for v in line.split()[-3:]] for line in out.splitlines()
            if line.startswith(("fixed ", "auto "))}
    assert set(rows) == {"fixed", "auto"}, out
    for alone, beside, ratio in rows.values():
        assert alone > 0 and beside > 0 and ratio == pytest.approx(beside / alone, rel=0.06)  # seconds printed to 0.1
    assert _ratio(out, "speedup beside, auto over fixed") == pytest.approx(rows["fixed"][1] / rows["auto"][1], rel=0.06)
    cores = int(re.search(r"(\d+) cores", out).group(1))
    if cores == 2:
        assert "policy: other processes use" in out and "1 CPU thread(s)" in out, out


def test_finetune_cost_splits_data_and_step_per_budget(data):
    out = _run("finetune_cost.py", "--budgets", "1", "4", "--iterations", "4", "--batches", "3", "--batch-size", "4")
    rows = {int(line.split()[0]): line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["1"], ["4"])}
    assert set(rows) == {1, 4}, out
    assert [int(rows[b][0]) for b in (1, 4)] == [2, 4]  # the batch: min(batch_size, max(2, budget))
    assert all(int(v[1]) == 4 and float(v[2]) > float(v[3]) > 0 for v in rows.values())  # a step costs more than its data
    per_image = [float(rows[b][2]) / int(rows[b][0]) for b in (1, 4)]
    assert _ratio(out, "per-image ratio") == pytest.approx(per_image[1] / per_image[0], rel=0.05)


@pytest.mark.slow
@pytest.mark.distributed
def test_ray_ablation_benchmark_compares_the_same_runs(data):
    tiny = ["methods=[scratch,supervised]", "budgets=[2]", "seeds=[0]", "pretrain.train.epochs=1", "pretrain.train.epoch_length=2",
            "pretrain.train.batch_size=4", "pretrain.model.channels=[16,32,32]", "finetune.schedule.min_iterations=2",
            "finetune.schedule.max_iterations=2", "finetune.schedule.epochs=1"]
    out = _run("ray_ablation.py", "--set", *tiny)
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["runs"] == 2 and figures["same_results"] is True  # Ray ran the sequential runner's runs, same Dice
    assert figures["max_dice_diff"] <= 1e-6  # one thread on both sides here (the suite's OMP_NUM_THREADS=1): identical
    assert figures["sequential_s"] > 0 and figures["ray_s"] > 0
    assert 0 < figures["task_round_trip_ms"] < 5000 and figures["ray_init_s"] > 0
