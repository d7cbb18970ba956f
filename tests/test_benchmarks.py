"""benchmarks/: a smoke of each script at its smallest setting on the CPU.

Each test runs one script as a user does (``python benchmarks/<script>.py ...``, in this process: :func:`run`; ``bash
benchmarks/gpu_check.sh --smoke``) and checks that it exits 0 and prints the figures it promises (benchmarks/README.md and the script's
docstring): the rows and columns by name, the settings it was given echoed back, every figure a finite number. Speed
is not asserted (that is what the benchmarks measure), nor is printed arithmetic re-derived: the figures themselves
are recorded from full-size runs in benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, as_own_process, exit_status, isic_yaml, ph2_yaml

BENCH = REPO_ROOT / "benchmarks"


OWN_PROCESS = {"ray_ablation.py": "Ray's workers and its driver's state live as long as the process that started them",
               "cpu_contention.py": "its fixed thread team is torch's at the interpreter's start (OMP_NUM_THREADS)"}
"""Scripts that run as their own process here (gpu_check.sh too, a shell script); every other one runs in this one."""


def run(*cmd: str, env: dict | None = None, timeout: float = 600) -> str:
    """The stdout of ``cmd`` (a script under benchmarks/ with its arguments), run from the repository; exit 0 asserted.

    A Python script runs as ``python benchmarks/<script>.py <args>`` would, in this process (``runpy`` as
    ``__main__``, with that ``sys.argv`` and benchmarks/ first on the path; :func:`conftest.as_own_process` puts back
    what it changes): what it prints, its exit status, the children it starts for its own measurements are the same,
    without a second interpreter importing torch and MONAI for each smoke. Shell scripts and :data:`OWN_PROCESS` run
    as child processes, stopped after ``timeout`` seconds; a script run in this process is interrupted then (a
    ``TimeoutError`` raised in it, which also stops the child process it is waiting for)."""
    if cmd[0].endswith(".sh") or cmd[0] in OWN_PROCESS:
        argv = ["bash", str(BENCH / cmd[0]), *cmd[1:]] if cmd[0].endswith(".sh") else [sys.executable, str(BENCH / cmd[0]), *cmd[1:]]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env={**os.environ, **(env or {})})
        assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res.stdout
    import runpy

    with as_own_process(REPO_ROOT, [str(BENCH / cmd[0]), *cmd[1:]], env) as (out, err):
        sys.path.insert(0, str(BENCH))
        with time_limit(timeout, " ".join(cmd)):
            code, last = exit_status(lambda: runpy.run_path(str(BENCH / cmd[0]), run_name="__main__"))
    assert code == 0, f"{' '.join(cmd)} exited {code}:\n{out.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}\n{last[-3000:]}"
    return out.getvalue()


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Raise ``TimeoutError`` in the code this wraps once ``seconds`` have passed (a real-time timer: the test's own
    thread, which is the worker's main thread)."""
    import signal

    def stop(signum, frame):
        raise TimeoutError(f"{what} ran past its {seconds:g} s limit")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_script_run_in_this_process_is_stopped_at_its_limit():
    import time

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="sleeper ran past its 0.2 s limit"), time_limit(0.2, "sleeper"):
        time.sleep(30)
    assert time.monotonic() - started < 5


def finite(text: str) -> float:
    """A printed figure (``12.5``, ``3.6%``) as a float; fails unless it is a finite number."""
    try:
        v = float(text.rstrip("%"))
    except ValueError:
        pytest.fail(f"{text!r} is not a number")
    assert math.isfinite(v), f"figure {text!r} is not finite"
    return v


def line(out: str, pattern: str) -> re.Match:
    """The first line matching ``pattern`` (a regex anchored at the line's start)."""
    m = re.search(pattern, out, re.M)
    assert m, f"no line matching {pattern!r} in:\n{out}"
    return m


def table(out: str, names: list[str], columns: int, width: int = 1) -> dict[str, list[float]]:
    """The rows named ``names`` (the first ``width`` words of a line, joined by a space), in that order, each with
    ``columns`` finite figures after its name."""
    rows = {}
    for text in out.splitlines():
        words = text.split()
        name = " ".join(words[:width])
        if name in names and name not in rows:
            assert len(words) == width + columns, f"row {name!r}: {columns} figures expected in {text!r}"
            rows[name] = [finite(w) for w in words[width:]]
    assert list(rows) == names, f"rows {names} expected, found {list(rows)} in:\n{out}"
    return rows


NUM = r"([-+]?[0-9.]+(?:e[-+]?[0-9]+)?|[-+]?nan|[-+]?inf)"
"""A printed figure in a regex (nan and inf caught here so that :func:`finite` names them)."""


def figures(m: re.Match) -> list[float]:
    return [finite(g) for g in m.groups()]


SMOKED_BY = {"precision_throughput.py": "gpu_check.sh"}
"""Scripts smoked as a step of another (``gpu_check.sh --smoke`` runs ``precision_throughput.py`` first)."""


def test_every_benchmark_script_has_a_smoke():
    """Each script in benchmarks/ is run by a test below (directly or as a step of another): a new one needs its smoke."""
    source = Path(__file__).read_text()
    scripts = sorted(p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh"))
    assert "pretrain_throughput.py" in scripts and "gpu_check.sh" in scripts
    assert [s for s in scripts if f'run("{SMOKED_BY.get(s, s)}"' not in source] == []


# ------------------------------------------------------------------------------------------ pretrain_throughput.py
@pytest.mark.slow(seconds=25)
def test_pretrain_throughput(data):
    """Images/s, peak memory, warm-up and timed seconds of the plain loop and of the engine, and their ratios."""
    out = run("pretrain_throughput.py", "--iters", "1", "--batch", "2", "--res", "32")
    line(out, r"^pretraining \(hybrid\), batch 2, 32 px, 1 timed iterations, on cpu")
    rows = table(out, ["plain", "engine"], 4)
    assert all(r[0] > 0 and r[1] > 0 and r[3] > 0 for r in rows.values()), rows  # images/s, peak MB, timed s
    assert all(v > 0 for v in figures(line(out, rf"^ratio engine/plain: throughput {NUM}, peak memory {NUM}$")))


# ------------------------------------------------------------------------------------------ inference_latency.py
def test_inference_latency(data):
    """ms/image and peak RSS of the plain loop, of medhybrid's inference and of it with the quality CSV; the ratios."""
    out = run("inference_latency.py", "--images", "1", "--res", "32", "--batch", "1")
    line(out, r"^inference latency, 1 PH2 test images \(native ~\(\d+, \d+\)\), 32 px, batch 1, on cpu")
    rows = table(out, ["plain", "medhybrid", "+quality"], 2)
    assert all(ms > 0 and mb > 0 for ms, mb in rows.values()), rows
    assert all(v > 0 for v in figures(line(out, rf"^ratio medhybrid/plain: latency {NUM}; with the quality CSV {NUM}$")))


# ------------------------------------------------------------------------------------------ finetune_cost.py
def test_finetune_cost(data):
    """Per budget: the batch, iterations, s/iteration, the data path alone and its share, ms/image; the ratios."""
    out = run("finetune_cost.py", "--budgets", "1", "2", "--iterations", "1", "--batches", "1", "--batch-size", "2")
    line(out, r"^fine-tune cost by budget \(PH2, quick U-Net, train.batch_size 2, \d+ CPU threads\)")
    rows = table(out, ["1", "2"], 6)
    assert [r[:2] for r in rows.values()] == [[2, 1], [2, 1]], rows  # batch min(2, max(2, budget)), 1 iteration
    figures(line(out, rf"^s/iter ratio budget 2/1 {NUM}; batch ratio {NUM}; per-image ratio {NUM}$"))


# ------------------------------------------------------------------------------------------ semi_cost.py
@pytest.mark.slow(seconds=20)
def test_semi_cost(data):
    """Per budget, plain fine-tuning and each semi-supervised algorithm: labelled and total batch, iterations,
    s/iteration, and each one's ratio to plain."""
    out = run("semi_cost.py", "--budgets", "1", "--iterations", "1", "--unlabelled-batch", "1")
    line(out, r"^semi-supervised fine-tuning cost per iteration \(PH2, quick U-Net, 64 px, \d+ CPU threads\)")
    rows = table(out, ["1 none", "1 mean-teacher", "1 fixmatch", "1 denoise"], 5, width=2)
    assert [r[:3] for r in rows.values()] == [[2, 2, 1], [2, 3, 1], [2, 3, 1], [2, 3, 1]], rows  # + 1 unlabelled image
    assert rows["1 none"][4] == 1.0  # plain against itself


# ------------------------------------------------------------------------------------------ cpu_contention.py
@pytest.mark.slow(seconds=80)
def test_cpu_contention(data):
    """A fine-tune alone and beside one busy process, the thread team fixed and under the policy: seconds, the ratios,
    the cores it saw."""
    out = run("cpu_contention.py", "--budget", "1", "--iters", "1", env={"OMP_NUM_THREADS": "2"})
    cores = int(line(out, r"^fine-tune: 1 PH2 images, 1 iterations of 8, quick U-Net; (\d+) cores, 1 busy").group(1))
    assert cores >= 1
    for team in ("fixed 2", "auto"):  # seconds alone, beside, and their ratio
        alone, beside, _ = figures(line(out, rf"^{team} +{NUM} +{NUM} +{NUM}$"))
        assert alone > 0 and beside > 0, out
    figures(line(out, rf"^slowdown beside: fixed {NUM}, auto {NUM} \(losing 1 of {cores} cores: {NUM}\)$"))
    figures(line(out, rf"^speedup beside, auto over fixed {NUM}$"))
    figures(line(out, rf"^alone, auto/fixed {NUM}$"))


# ------------------------------------------------------------------------------------------ unlabelled_scale.py
@pytest.mark.slow(seconds=70)
def test_unlabelled_scale(data):
    """Pretraining on unlabelled images in memory and through the disk cache, the set and a 2x set: images, setup and
    training seconds, images/s, peak RSS; the cache's size and the ratios."""
    out = run("unlabelled_scale.py", "--repeat", "2", "--images", "2", "--iters", "1", "--batch", "2", "--res", "32")
    line(out, r"^unlabelled pretraining \(diffusion, 32 px, batch 2, 1 iterations\), 2 and 4 ISIC images")
    rows = table(out, ["memory-1x", "memory-2x", "disk-2x-cold", "disk-2x-warm"], 5)
    assert [r[0] for r in rows.values()] == [2, 4, 4, 4], rows  # every linked copy is its own image
    assert finite(line(out, r"^disk cache: (\S+) MB").group(1)) > 0  # something was cached
    for name in ("peak memory memory-2x/memory-1x", "peak memory disk-2x/memory-2x", "peak memory disk-2x/memory-1x",
                 "throughput disk-warm/memory", "throughput disk-cold/memory", "setup disk/memory at 2x"):
        figures(line(out, rf"^{re.escape(name)} {NUM}$"))


# ------------------------------------------------------------------------------------------ large_images.py
@pytest.mark.slow(seconds=45)
def test_large_images(data, tmp_path):
    """The bundle's inference on the shipped camera photographs (up to 4288 x 2848, ``--photos``, taken in turn) beside
    the previous pipeline and Pillow's decode: images, wall seconds, ms/image, the multiple of Pillow's decode, peak RSS;
    the time per added image; the Dice between the two pipelines' masks. (Without ``--photos`` the script makes its
    images by upscaling PH2 test images: the same pipelines on other files.)"""
    photos = data / "dermoscopy" / "camera_photos" / "images"
    out = run("large_images.py", "--photos", str(photos), "--images", "2", "--previous", "1", "--workdir", str(tmp_path))
    line(out, rf"^large images: 2 camera photographs \(\d+x\d+ to \d+x\d+\) from {re.escape(str(photos))}, bundle "
              r"dermoscopy_lesion_segmentation")
    figures(line(out, rf"^Pillow full decode: {NUM} s \({NUM} ms/image\)$"))
    rows = table(out, ["previous", "one", "new"], 5)
    assert [r[0] for r in rows.values()] == [1, 1, 2], rows
    figures(line(out, rf"^new, per added image \(start-up left out\): {NUM} ms, {NUM} x decode$"))
    figures(line(out, rf"^speed-up new/previous \(per image\): {NUM}$"))
    mean, low = figures(line(out, rf"^masks, Dice new vs previous on 1 images: mean {NUM}, min {NUM}, identical [01] of 1$"))
    assert 0 <= low <= mean <= 1
    line(out, r"^goals \(2 images\): whole run <= 5x Pillow decode: (met|NOT met); per added image <= 5x: (met|NOT met); "
              r"peak RSS < 1 GB: (met|NOT met)$")
    masks = sorted(p.name for p in (tmp_path / "masks_photos_new").glob("*_mask.png"))
    assert len(masks) == 2 and masks[0].startswith("photo_000_")


# ------------------------------------------------------------------------------------------ ablation_time.py
@pytest.mark.slow(seconds=60)
def test_ablation_time(data, tmp_path):
    """A tiny ablation by the tool and by the plain script: seconds per method and stage, mean test Dice, wall times
    and the ratios; the ``ddpm-features`` head is left out of both."""
    import yaml

    cpu = {"device": "cpu", "progress": False}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "source": str(isic_yaml(tmp_path / "datasets", n_train=4, n_val=1)),
        "target": str(ph2_yaml(tmp_path / "datasets", n_pool=2, n_test=1)),
        "methods": {"scratch": {"pretrain": "none"}, "supervised": {"pretrain": "supervised"},
                    "ddpm-features": {"pretrain": "diffusion", "head": "ddpm-features"}},
        "reference": "supervised",
        "pretrain": {"preprocess": {"resolution": 32}, "model": {"channels": [16, 32], "attention_levels": [False, False]},
                     "train": {"epochs": 1, "epoch_length": 1, "batch_size": 2, "warmup_iterations": 0, "val_max_images": 1,
                               **cpu}},
        "finetune": {"train": {"batch_size": 2, "warmup_iterations": 0, **cpu},
                     "schedule": {"per_label": 1, "min_iterations": 1, "max_iterations": 1, "epochs": 1}},
        "profiles": {"tiny": {"budgets": [2], "seeds": [0]}}}))
    out = run("ablation_time.py", "--config", str(path), "--profile", "tiny")
    assert "ddpm-features" not in out
    line(out, r"^ablation \S+: 2 methods x 1 budgets x 1 seeds \(1 fine-tunes per method\) on cpu")
    rows = table(out, [f"{m} {s}" for m in ("scratch", "supervised") for s in ("plain", "medhybrid")], 4, width=2)
    assert all(0 <= r[3] <= 1 for r in rows.values()), rows  # the mean test Dice
    figures(line(out, rf"^wall time: plain {NUM} s, medhybrid {NUM} s$"))
    figures(line(out, rf"^ratio medhybrid/plain: wall {NUM} \(pretrain {NUM}, train {NUM}, eval {NUM}\)$"))


# ------------------------------------------------------------------------------------------ bundle_semi.py
@pytest.mark.slow(seconds=90)
def test_bundle_semi(data):
    """The dermoscopy bundle's train.json with its semi-supervised recipe and with labels alone, each scored on a
    held-back pool image: the counts, each arm's Dice and training seconds, the difference, the JSON figures."""
    out = run("bundle_semi.py", "--labels", "1", "--heldout", "1", "--unlabelled", "2", "--seeds", "0", "--bundles",
              "dermoscopy", "--iterations", "1")
    (row,) = json.loads(out.strip().splitlines()[-1])
    assert (row["bundle"], row["seed"], row["labelled"], row["heldout"], row["unlabelled"]) == ("dermoscopy", 0, 1, 1, 2)
    assert row["algorithm"] == "fixmatch"  # the dermoscopy bundle's own semi_algorithm
    for arm in ("semi", "labels-only"):
        assert 0 <= finite(str(row[f"{arm}_dice"])) <= 1 and finite(str(row[f"{arm}_train_s"])) > 0, row
    figures(line(out, rf"^dermoscopy seed 0: 1 labelled, 2 unlabelled, 1 held out: semi \(fixmatch\) {NUM} \({NUM} s\), "
                      rf"labels-only {NUM} \({NUM} s\), difference {NUM}$"))
    figures(line(out, rf"^dermoscopy: mean held-out Dice semi {NUM}, labels-only {NUM}, mean paired difference "
                      rf"\(semi - labels-only\) {NUM} over 1 seeds \([01] of 1 positive\)$"))


# ------------------------------------------------------------------------------------------ adapt_cost.py
def test_adapt_cost(data):
    """``medhybrid adapt`` on the dermoscopy bundle with 2 labelled and 1 unlabelled PH2 images, one recipe and one
    iteration per fine-tune: the whole time, the seconds and share of each stage, the decision."""
    out = run("adapt_cost.py", "--labels", "2", "--unlabelled", "1", "finetune.schedule.min_iterations=1",
              "finetune.schedule.max_iterations=1", "finetune.schedule.epochs=1", "finetune.train.warmup_iterations=0",
              "recipes={plain: {}}", "wise=[1.0]")
    assert finite(line(out, r"^adapt: 2 labelled \+ 1 unlabelled images, menu plain: (\S+) s in all").group(1)) > 0
    for stage in ("read the model and data", "score the start", "folds: plain", "decide", "final fine-tune and report"):
        seconds, share = figures(line(out, rf"^  {re.escape(stage)} +{NUM} s +{NUM}%$"))
        assert seconds >= 0 and 0 <= share <= 100, (stage, seconds, share)
    line(out, r"^decision: \S+ \(.+\)$")


# ------------------------------------------------------------------------------------------ ray_ablation.py
@pytest.mark.slow(seconds=100)
@pytest.mark.distributed
def test_ray_ablation(data, tmp_path):
    """The smallest ablation with a run, a pretraining and a failing method (``scratch``: one fine-tune; ``broken``: its
    fine-tune fails as training starts, on a device that does not exist), sequentially and on a local Ray instance with
    1 worker: the wall times, their ratio, Ray's start and task round trip, whether the runs and failures agree, as a
    human line and as JSON. The two runs' MLflow records (the benchmark's server store) hold the same Dice and one
    parent each, FAILED.

    Left out for time: more workers and runs, where Ray's scheduling would show, pretrainings that learn (one ``none``
    pretraining here: the Ray task path is the same), and the overhead figures (``--tasks 0``: Ray's start and an empty
    task's round trip need a Ray instance of their own). Alone on a 2-core CPU this takes about a minute; beside the
    suite's other workers Ray's processes wait for the cores, and it took 170-330 s with the overhead figures in."""
    from conftest import child_runs, mlflow_client

    tiny = [f"target={ph2_yaml(tmp_path, n_pool=1, n_test=1)}", f"source={isic_yaml(tmp_path, n_train=1, n_val=1)}",
            "methods={scratch: {pretrain: none}, broken: {pretrain: none, finetune: {train: {device: no-such-device}}}}",
            "reference=scratch", "budgets=[1]", "seeds=[0]", "pretrain.preprocess.resolution=32",
            "pretrain.model.channels=[16,32]", "pretrain.model.attention_levels=[false,false]",
            "finetune.schedule.min_iterations=1", "finetune.schedule.max_iterations=1", "finetune.schedule.epochs=1"]
    out = run("ray_ablation.py", "--workers", "1", "--tasks", "0", "--out", str(tmp_path / "bench"), "--set", *tiny)
    figures_ = json.loads(out.strip().splitlines()[-1])
    assert {k: figures_[k] for k in ("sets", "workers", "tasks", "runs", "failed_runs", "same_results")} == {
        "sets": tiny, "workers": 1, "tasks": 0, "runs": 1, "failed_runs": {"sequential": ["broken b1 s0"], "ray": ["broken b1 s0"]},
        "same_results": True}, figures_
    for k in ("sequential_s", "ray_s", "ray_vs_sequential", "max_dice_diff"):
        assert finite(str(figures_[k])) >= 0, (k, figures_)
    assert "ray_init_s" not in figures_ and "task_round_trip_ms" not in figures_  # --tasks 0: no Ray instance for these
    human = out.strip().splitlines()[-2]
    assert re.match(rf"ablation \S+ .*: sequential {NUM} s, Ray with 1 workers {NUM} s \(ratio {NUM}\); "
                    rf"1 runs, largest test Dice difference {NUM}; failed runs: sequential 1, Ray 1$", human), human

    store = f"sqlite:///{tmp_path / 'bench' / 'mlflow-server.db'}"  # the server's store, kept by --out
    dice = {}
    for executor in ("sequential", "ray"):
        parent = json.loads((tmp_path / "bench" / executor / "state.json").read_text())["mlflow_run_id"]
        assert mlflow_client(store).get_run(parent).info.status == "FAILED"  # "broken" failed, scratch finished
        dice[executor] = {(r.data.tags["method"], r.data.tags["budget"], r.data.tags["seed"]): r.data.metrics["test_dice"]
                          for r in child_runs(store, parent) if "test_dice" in r.data.metrics}
    assert list(dice["ray"]) == [("scratch", "1", "0")]
    assert dice["ray"] == pytest.approx(dice["sequential"], abs=1e-6)  # one thread on both sides: the same sums


# ------------------------------------------------------------------------------------------ gpu_check.sh (+ precision_throughput.py)
@pytest.mark.slow(seconds=40)
def test_gpu_check_smoke(data, tmp_path):
    """``benchmarks/gpu_check.sh --smoke`` on the CPU, two methods on a few real ISIC and PH2 images: its first step is
    ``precision_throughput.py`` (the compile variant left out by ``--smoke``), whose table, ratio and JSON are checked
    here, then the shortened ablation to its report."""
    env = {"OUT": str(tmp_path / "out"), "SMOKE_SOURCE": str(isic_yaml(tmp_path / "ds", n_train=4, n_val=1)),
           "SMOKE_TARGET": str(ph2_yaml(tmp_path / "ds", n_pool=2, n_test=1)), "METHODS": "[scratch,supervised]",
           "PY": sys.executable}
    out = run("gpu_check.sh", "--smoke", env=env, timeout=900)
    line(out, r"^no GPU \(nvidia-smi not found\)$")
    line(out, r"^pretraining \(hybrid\) at the dermoscopy/full profile: 32 px, batch 4, U-Net channels \[16, 32, 32, 32\], "
              r"2 timed iterations, on cpu")
    rows = table(out, ["fp32", "bf16+channels-last"], 4)
    assert all(r[0] > 0 and r[1] > 0 for r in rows.values()), rows
    assert "bf16+channels-last+compile" not in out
    figures(line(out, rf"^ratio bf16\+channels-last/fp32: throughput {NUM}, peak memory {NUM}$"))
    saved = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert list(saved) == ["fp32", "bf16+channels-last"]
    assert all(finite(str(v[k])) > 0 for v in saved.values() for k in ("images_per_s", "peak_mb", "timed_s")), saved
    report = tmp_path / "out" / "ablation" / "report" / "report.md"
    line(out, rf"^ablation: \d+ s; report {re.escape(str(report))}$")
    md = report.read_text()
    assert "| scratch |" in md and "| supervised |" in md and "| supervised (supervised) |" in md, md
    line(out, r"^gpu_check: \d+ s in all$")
