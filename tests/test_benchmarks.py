"""benchmarks/: each script runs at small sizes on the CPU and prints medhybrid's figures beside a plain
PyTorch loop's, with their ratio (the figures themselves are recorded in benchmarks/README.md).

No speed is asserted here (that is what the benchmarks measure). What is asserted holds by construction on any
machine, so it fails when a benchmark is broken, not when the machine is slow:

- every printed ratio is the quotient of the printed figures it names, to the precision they are printed with
  (interval arithmetic on the printed digits: :class:`Printed`);
- counts, sizes and settings echoed in the output are the ones requested;
- the timings add up: the time a benchmark says it measured (images / images-per-second, ms/image x images, the
  stages of a run) fits inside the wall time of the benchmark process that printed it;
- memory figures are physically sensible (a process that imported torch holds more than 100 MB, and no process
  holds more than the machine's memory); Dice lies in [0, 1].

Each check is a function of the printed text (``check_*``), so it can be tried on a doctored output.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from conftest import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks"
_NUM = r"[0-9]+(?:\.[0-9]+)?"


def _run(script: str, *args: str, env: dict | None = None) -> tuple[str, float]:
    """The benchmark's stdout and the wall seconds of its process (children included)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                         env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, wall


# ------------------------------------------------------------------------------------------ printed figures
@dataclass(frozen=True)
class Printed:
    """A figure as printed: the interval of values that print as those digits (``"24.0"`` is [23.95, 24.05])."""

    lo: float
    hi: float

    @classmethod
    def of(cls, text: str, scale: float = 1.0) -> Printed:
        text = text.strip().rstrip("%")
        half = 0.5 * 10.0 ** -(len(text.split(".")[1]) if "." in text else 0)
        v = float(text)
        return cls(max(0.0, v - half) * scale, (v + half) * scale)

    @classmethod
    def exact(cls, v: float) -> Printed:
        return cls(v, v)

    def __add__(self, o: Printed) -> Printed:
        return Printed(self.lo + o.lo, self.hi + o.hi)

    def __mul__(self, k: float) -> Printed:  # by a positive constant
        return Printed(self.lo * k, self.hi * k)

    def __truediv__(self, o: Printed | float) -> Printed:  # of non-negative figures
        o = o if isinstance(o, Printed) else Printed.exact(o)
        return Printed(self.lo / o.hi if o.hi > 0 else math.inf, self.hi / o.lo if o.lo > 0 else math.inf)

    def agrees(self, o: Printed) -> bool:
        return self.lo <= o.hi and o.lo <= self.hi


def total(figures) -> Printed:
    out = Printed.exact(0.0)
    for f in figures:
        out = out + f
    return out


def assert_quotient(ratio: Printed, num: Printed, den: Printed, what: str) -> None:
    assert ratio.agrees(num / den), f"{what}: printed {ratio} is not the quotient {num} / {den}"


def assert_fits(measured: Printed, wall: float, what: str) -> None:
    assert measured.lo <= wall, f"{what}: {measured.lo:.2f} s measured, but the benchmark ran {wall:.2f} s in all"


def _mem_total_mb() -> float:
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:")) / 1024


def assert_sensible_rss(mb: Printed, what: str) -> None:
    assert 100 <= mb.hi and mb.lo <= _mem_total_mb(), f"{what}: peak {mb} MB is not a torch process's memory on this machine"


def field(text: str, pattern: str) -> Printed:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return Printed.of(m.group(1))


def rows(text: str, first: tuple[str, ...]) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()[:1] and line.split()[0] in first}


# ------------------------------------------------------------------------------------------ pretrain_throughput.py
def check_throughput(out: str, wall: float, mode: str, iters: int, batch: int, res: int) -> None:
    stage = "fine-tuning" if mode == "finetune" else f"pretraining ({mode})"
    assert out.startswith(f"{stage}, batch {batch}, {res} px, {iters} timed iterations"), out
    r = rows(out, ("plain", "engine"))
    assert set(r) == {"plain", "engine"}, out
    ips = {k: Printed.of(v[0]) for k, v in r.items()}
    peak = {k: Printed.of(v[1]) for k, v in r.items()}
    warm = {k: Printed.of(v[2]) for k, v in r.items()}
    timed = {k: Printed.of(v[3]) for k, v in r.items()}
    for k in r:
        assert ips[k].hi > 0, out
        assert_sensible_rss(peak[k], k)
        # images/s is the timed iterations' images over their time: a throughput that forgot the batch fails here
        assert_quotient(ips[k], Printed.exact(iters * batch), timed[k], f"{k} images/s")
    # the timed iterations and the warm-up of both variants ran inside the benchmark
    assert_fits(total(timed[k] + warm[k] for k in r), wall, "timed + warm-up, both variants")
    assert_quotient(field(out, rf"ratio engine/plain: throughput ({_NUM})"), ips["engine"], ips["plain"], "throughput")
    assert_quotient(field(out, rf"ratio engine/plain: .*peak memory ({_NUM})"), peak["engine"], peak["plain"], "peak memory")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hybrid", "finetune"])
def test_training_throughput_side_by_side(data, mode):
    out, wall = _run("pretrain_throughput.py", "--iters", "2", "--batch", "2", "--res", "32", "--mode", mode)
    check_throughput(out, wall, mode, iters=2, batch=2, res=32)


# ------------------------------------------------------------------------------------------ inference_latency.py
def check_latency(out: str, wall: float, images: int, res: int, batch: int) -> None:
    assert f"{images} PH2 test images" in out and f", {res} px, batch {batch}," in out, out
    r = rows(out, ("plain", "medhybrid", "+quality"))
    assert set(r) == {"plain", "medhybrid", "+quality"}, out
    ms = {k: Printed.of(v[0]) for k, v in r.items()}
    for k, v in r.items():
        assert ms[k].hi > 0, out
        assert_sensible_rss(Printed.of(v[1]), k)
    assert_fits(total(ms[k] * (images / 1000) for k in r), wall, "ms/image x images, all three")
    assert_quotient(field(out, rf"latency ({_NUM})"), ms["medhybrid"], ms["plain"], "latency")
    assert_quotient(field(out, rf"with the quality CSV ({_NUM})"), ms["+quality"], ms["plain"], "latency with quality")


def test_inference_latency_side_by_side(data):
    out, wall = _run("inference_latency.py", "--images", "3", "--res", "32", "--batch", "2")
    check_latency(out, wall, images=3, res=32, batch=2)


# ------------------------------------------------------------------------------------------ ablation_time.py
def check_ablation_time(out: str, wall: float, methods: tuple[str, ...], budgets: int, seeds: int) -> None:
    assert f": {len(methods)} methods x {budgets} budgets x {seeds} seeds ({budgets * seeds} fine-tunes per method)" in out, out
    table = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines() if line.split()[:1] and line.split()[0] in methods}
    sides = ("plain", "medhybrid")
    assert set(table) == {(m, s) for m in methods for s in sides}, out
    stage = {k: [Printed.of(v) for v in vals[:3]] for k, vals in table.items()}
    for k, vals in table.items():
        assert 0 <= float(vals[3]) <= 1, f"{k}: test Dice {vals[3]}"
    side_wall = {s: field(out, rf"wall time: .*{s} ({_NUM}) s") for s in sides}
    for s in sides:
        # the stages of every method happen inside the side's run, and each side inside the benchmark
        assert_fits(total(x for m in methods for x in stage[(m, s)]), side_wall[s].hi, f"{s} stages")
        assert_fits(side_wall[s], wall, f"{s} side")
        if "scratch" in methods and "hybrid" in methods:  # scratch has no pretraining: a subset of hybrid's stage
            assert stage[("scratch", s)][0].lo <= stage[("hybrid", s)][0].hi, out
    assert_quotient(field(out, rf"wall ({_NUM})"), side_wall["medhybrid"], side_wall["plain"], "wall")
    for i, name in enumerate(("pretrain", "train", "eval")):
        per_side = {s: total(stage[(m, s)][i] for m in methods) for s in sides}
        assert_quotient(field(out, rf"(?:\(|, ){name} ({_NUM})"), per_side["medhybrid"], per_side["plain"], name)


@pytest.mark.slow
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
    out, wall = _run("ablation_time.py", "--config", str(path), "--profile", "tiny")
    assert "ddpm-features" not in out
    check_ablation_time(out, wall, ("scratch", "hybrid"), budgets=1, seeds=2)


# ------------------------------------------------------------------------------------------ unlabelled_scale.py
def check_unlabelled(out: str, wall: float, repeat: int, images: int, iters: int, batch: int, res: int, channels: int = 3) -> None:
    assert f"(diffusion, {res} px, batch {batch}, {iters} iterations), {images} and {images * repeat} ISIC images" in out, out
    names = ("memory-1x", f"memory-{repeat}x", f"disk-{repeat}x-cold", f"disk-{repeat}x-warm")
    r = rows(out, names)
    assert list(r) == list(names), out
    assert [int(v[0]) for v in r.values()] == [images] + [images * repeat] * 3, out  # every linked copy is its own image
    setup = {k: Printed.of(v[1]) for k, v in r.items()}
    train = {k: Printed.of(v[2]) for k, v in r.items()}
    ips = {k: Printed.of(v[3]) for k, v in r.items()}
    rss = {k: Printed.of(v[4]) for k, v in r.items()}
    for k in names:
        # images/s is the requested images (iterations x batch) over the training seconds
        assert ips[k].agrees(Printed.exact(iters * batch) / train[k]), f"{k}: {ips[k]} images/s over {train[k]} s"
        assert_sensible_rss(rss[k], k)
    assert_fits(total(setup[k] + train[k] for k in names), wall, "setup + training, all variants")
    # the disk cache holds preprocessed arrays (channels x res x res float32, with room for metadata), at most
    # one per image of the large set: never more, and something once an image was drawn
    cache_mb = field(out, rf"disk cache: ({_NUM}) MB")
    assert cache_mb.hi > 0 and cache_mb.lo <= images * repeat * 4 * channels * res * res * 4 / 2**20, out
    m1, mr, cold, warm = names
    for line, num, den in ((f"peak memory {mr}/{m1}", rss[mr], rss[m1]),
                           (f"peak memory disk-{repeat}x/memory-{repeat}x", rss[warm], rss[mr]),
                           (f"peak memory disk-{repeat}x/memory-1x", rss[warm], rss[m1]),
                           ("throughput disk-warm/memory", ips[warm], ips[mr]),
                           ("throughput disk-cold/memory", ips[cold], ips[mr]),
                           (f"setup disk/memory at {repeat}x", setup[warm], setup[mr])):
        assert_quotient(field(out, rf"{re.escape(line)} ({_NUM})"), num, den, line)


@pytest.mark.slow(seconds=70)
def test_unlabelled_scale_memory_against_disk_cache(data):
    out, wall = _run("unlabelled_scale.py", "--repeat", "3", "--images", "12", "--iters", "2", "--batch", "4", "--res", "32")
    check_unlabelled(out, wall, repeat=3, images=12, iters=2, batch=4, res=32)


# ------------------------------------------------------------------------------------------ cpu_contention.py
def check_contention(out: str, wall: float, budget: int, iters: int, competitors: int = 1) -> None:
    m = re.search(rf"fine-tune: {budget} PH2 images, {iters} iterations of \d+, quick U-Net; (\d+) cores, {competitors} busy", out)
    assert m, out
    cores = int(m.group(1))
    assert 1 <= cores <= (os.cpu_count() or 1), out
    table = {line.split()[0]: line.split()[-3:] for line in out.splitlines() if line.startswith(("fixed ", "auto "))}
    assert set(table) == {"fixed", "auto"}, out
    alone = {k: Printed.of(v[0]) for k, v in table.items()}
    beside = {k: Printed.of(v[1]) for k, v in table.items()}
    for k, v in table.items():
        assert alone[k].hi > 0 and beside[k].hi > 0, out
        assert_quotient(Printed.of(v[2]), beside[k], alone[k], f"{k} beside/alone")
        assert_quotient(field(out, rf"slowdown beside: .*{k} ({_NUM})"), beside[k], alone[k], f"{k} slowdown")
    # the four fine-tunes ran one after another inside the benchmark
    assert_fits(total([*alone.values(), *beside.values()]), wall, "four fine-tunes")
    assert_quotient(field(out, rf"losing {competitors} of {cores} cores: ({_NUM})"), Printed.exact(cores),
                    Printed.exact(max(1, cores - competitors)), "ideal slowdown")
    assert_quotient(field(out, rf"speedup beside, auto over fixed ({_NUM})"), beside["fixed"], beside["auto"], "speedup beside")
    assert_quotient(field(out, rf"alone, auto/fixed ({_NUM})"), alone["auto"], alone["fixed"], "alone auto/fixed")
    if cores == 2:  # on two cores the policy gives one up to the busy process
        assert "policy: other processes use" in out and "1 CPU thread(s)" in out, out


@pytest.mark.slow(seconds=60)
def test_cpu_contention_alone_and_beside_a_busy_process(data):
    """Both thread settings run alone and beside a busy process; on two cores the policy gives one up to it."""
    out, wall = _run("cpu_contention.py", "--budget", "2", "--iters", "3", env={"OMP_NUM_THREADS": "2"})
    check_contention(out, wall, budget=2, iters=3)


# ------------------------------------------------------------------------------------------ finetune_cost.py
def check_finetune_cost(out: str, wall: float, budgets: list[int], iterations: int, batches: int, batch_size: int) -> None:
    assert f"train.batch_size {batch_size}," in out, out
    r = {int(line.split()[0]): line.split()[1:] for line in out.splitlines() if line.split()[:1] in [[str(b)] for b in budgets]}
    assert list(r) == budgets, out
    batch = {b: int(r[b][0]) for b in budgets}
    assert batch == {b: min(batch_size, max(2, b)) for b in budgets}, out  # the batch: min(batch_size, max(2, budget))
    assert all(int(r[b][1]) == iterations for b in budgets), out
    step = {b: Printed.of(r[b][2]) for b in budgets}
    data_s = {b: Printed.of(r[b][3]) for b in budgets}
    for b in budgets:
        assert step[b].hi >= data_s[b].lo and data_s[b].hi > 0, out  # a step draws its batch and then trains on it
        assert_quotient(Printed.of(r[b][4], 0.01), data_s[b], step[b], f"budget {b} data share")
        assert_quotient(Printed.of(r[b][5]), step[b] * 1000, Printed.exact(batch[b]), f"budget {b} ms/image")
    # the fine-tunes and the data paths drawn alone ran inside the benchmark
    assert_fits(total(step[b] * iterations + data_s[b] * batches for b in budgets), wall, "fine-tunes + data paths")
    first, last = budgets[0], budgets[-1]
    assert_quotient(field(out, rf"s/iter ratio budget {last}/{first} ({_NUM})"), step[last], step[first], "s/iter ratio")
    assert_quotient(field(out, rf"batch ratio ({_NUM})"), Printed.exact(batch[last]), Printed.exact(batch[first]), "batch ratio")
    assert_quotient(field(out, rf"per-image ratio ({_NUM})"), step[last] / batch[last], step[first] / batch[first], "per-image ratio")


def test_finetune_cost_splits_data_and_step_per_budget(data):
    out, wall = _run("finetune_cost.py", "--budgets", "1", "4", "--iterations", "4", "--batches", "3", "--batch-size", "4")
    check_finetune_cost(out, wall, budgets=[1, 4], iterations=4, batches=3, batch_size=4)


# ------------------------------------------------------------------------------------------ ray_ablation.py
def check_ray(out: str, wall: float, sets: list[str], runs: int, workers: int = 2) -> None:
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["sets"] == sets and figures["workers"] == workers and figures["cores"] == os.cpu_count(), figures
    assert figures["runs"] == runs and figures["same_results"] is True, figures  # Ray ran the sequential runner's runs, same Dice
    assert figures["max_dice_diff"] <= 1e-6, figures  # one thread on both sides here (the suite's OMP_NUM_THREADS=1): identical
    seq, ray_s = Printed.of(f"{figures['sequential_s']:.1f}"), Printed.of(f"{figures['ray_s']:.1f}")
    assert seq.hi > 0 and ray_s.hi > 0, figures
    assert_quotient(Printed.of(f"{figures['ray_vs_sequential']:.3f}"), ray_s, seq, "ray_vs_sequential")
    # the start of Ray, its empty tasks (and the first one, the workers' import) and both ablations ran one after
    # another inside the benchmark
    trips = Printed.of(f"{figures['task_round_trip_ms']:.2f}") * ((figures["tasks"] + 1) / 1000)
    assert figures["ray_init_s"] >= 0 and figures["task_round_trip_ms"] > 0, figures
    assert_fits(seq + ray_s + Printed.of(f"{figures['ray_init_s']:.2f}") + trips, wall, "Ray start, tasks and both ablations")
    # the human line says the same as the JSON
    line = out.strip().splitlines()[-2]
    assert f"{figures['runs']} runs" in line and f"Ray with {workers} workers" in line, line
    assert_quotient(field(line, rf"\(ratio ({_NUM})\)"), ray_s, seq, "printed ratio")


@pytest.mark.slow(seconds=300)  # 75 s alone, 300 s beside the suite's other workers: started first
@pytest.mark.distributed
def test_ray_ablation_benchmark_compares_the_same_runs(data, tmp_path):
    """The benchmark, and with it the Ray executor end to end: a tiny real ablation (a pretraining, fine-tunes and a
    method that fails) run sequentially and on a local Ray instance with 2 workers, both tracked on the benchmark's
    MLflow server. The same per-run Dice and the same failed runs; on Ray one parent with every fine-tune as a child,
    marked FAILED, and the pretraining timed."""
    from conftest import child_runs, isic_yaml, mlflow_client, ph2_yaml

    target = ph2_yaml(tmp_path, n_pool=6, n_test=3)  # a small test split: the smoke is about the runner, not Dice
    source = isic_yaml(tmp_path, n_train=4, n_val=2)
    tiny = [f"target={target}", f"source={source}", "methods={scratch: {pretrain: none}, supervised: {pretrain: supervised}, "
            "broken: {pretrain: supervised, head: ddpm-features}}", "reference=supervised", "budgets=[2]", "seeds=[0,1]",
            "pretrain.preprocess.resolution=32", "pretrain.model.channels=[16,32,32]", "pretrain.train.epochs=1",
            "pretrain.train.epoch_length=2", "pretrain.train.batch_size=4", "pretrain.train.warmup_iterations=0",
            "pretrain.train.val_max_images=2", "finetune.schedule.min_iterations=2", "finetune.schedule.max_iterations=2",
            "finetune.schedule.epochs=1"]
    out, wall = _run("ray_ablation.py", "--tasks", "5", "--out", str(tmp_path / "bench"), "--set", *tiny)
    check_ray(out, wall, tiny, runs=2 * 1 * 2)  # methods that ran x budgets x seeds
    figures = json.loads(out.strip().splitlines()[-1])
    broken = ["broken b2 s0", "broken b2 s1"]  # a ddpm-features head needs a generative pretraining: fails in both
    assert figures["failed_runs"] == {"sequential": broken, "ray": broken}, figures
    assert "failed runs: sequential 2, Ray 2" in out.strip().splitlines()[-2]

    store = f"sqlite:///{tmp_path / 'bench' / 'mlflow-server.db'}"  # the server's store, kept by --out
    dice = {}
    for executor in ("sequential", "ray"):
        parent = json.loads((tmp_path / "bench" / executor / "state.json").read_text())["mlflow_run_id"]
        assert mlflow_client(store).get_run(parent).info.status == "FAILED"  # "broken" failed, the others finished
        runs = child_runs(store, parent)
        dice[executor] = {(r.data.tags["method"], r.data.tags["budget"], r.data.tags["seed"]): r.data.metrics["test_dice"]
                          for r in runs if "test_dice" in r.data.metrics}
    assert sorted(dice["ray"]) == sorted((m, "2", s) for m in ("scratch", "supervised") for s in ("0", "1"))
    assert dice["ray"] == pytest.approx(dice["sequential"], abs=1e-6)
    timings = json.loads((tmp_path / "bench" / "ray" / "timings.json").read_text())["invocations"]
    assert timings[-1]["executor"] == "ray" and timings[-1]["methods"]["supervised"]["pretrain_s"] > 0


# ------------------------------------------------------------------------------------------ semi_cost.py
@pytest.mark.slow
def test_semi_cost_prints_each_algorithm_beside_plain_fine_tuning(data):
    out, _ = _run("semi_cost.py", "--budgets", "2", "--iterations", "2", "--unlabelled-batch", "2")
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.split()[:1] == ["2"]}
    assert list(rows) == ["none", "mean-teacher", "fixmatch", "denoise"], out
    assert rows["none"][3] == "2" and all(rows[a][3] == "4" for a in ("mean-teacher", "fixmatch", "denoise")), out
    assert all(rows[a][4] == "2" for a in rows), out  # iterations
    for a, r in rows.items():  # the ratio column is each s/iter over plain's, as printed
        assert_quotient(Printed.of(r[6]), Printed.of(r[5]), Printed.of(rows["none"][5]), f"{a} x plain")


# ------------------------------------------------------------------------------------------ bundle_semi.py
@pytest.mark.slow(seconds=70)
def test_bundle_semi_scores_both_arms_on_the_held_back_images(data):
    out, _ = _run("bundle_semi.py", "--labels", "1", "--heldout", "2", "--seeds", "0", "--bundles", "chest", "--iterations", "1",
                  "--arms", "semi", "plain")  # FixMatch with the bundle's own wise (the chest bundle: 1) against labels alone, wise=1
    (row,) = json.loads(out.strip().splitlines()[-1])
    assert (row["labelled"], row["heldout"], row["unlabelled"]) == (1, 2, 97), row  # OpenIST's pool of 100
    assert row["algorithm"] == "fixmatch", row  # the chest bundle ships semi_algorithm none: its semi arm is FixMatch
    assert 0 < row["semi_dice"] <= 1 and 0 < row["plain_dice"] <= 1 and "labels-only_dice" not in row, row
    line = next(x for x in out.splitlines() if x.startswith("chest seed 0:"))
    assert f"semi (fixmatch) {row['semi_dice']:.4f}" in line and f"plain {row['plain_dice']:.4f}" in line, out
    assert f"difference {row['semi_dice'] - row['plain_dice']:+.4f}" in line, out


# ------------------------------------------------------------------------------------------ large_images.py
@pytest.mark.slow
def test_large_images_compares_both_pipelines_with_pillow_decoding(data, tmp_path):
    out, wall = _run("large_images.py", "--images", "2", "--previous", "1", "--size", "1600x1200", "--workdir", str(tmp_path))
    assert "large images: 2 JPEG 1600x1200" in out, out
    per = field(out, rf"Pillow full decode: {_NUM} s \(({_NUM}) ms/image\)")
    r = rows(out, ("previous", "new"))
    assert r["previous"][0] == "1" and r["new"][0] == "2", out
    for side, v in r.items():
        wall_s, ms, times = Printed.of(v[1]), Printed.of(v[2]), Printed.of(v[3])
        assert_quotient(ms, wall_s * 1000, Printed.exact(float(v[0])), f"{side} ms/image")
        assert_quotient(times, ms, per, f"{side} x decode")
        assert_fits(wall_s, wall, side)
        assert_sensible_rss(Printed.of(v[4]), side)
    dice = field(out, rf"Dice new vs previous on 1 images: mean ({_NUM})")
    assert 0.9 <= dice.lo and dice.hi <= 1.0001, out


# ------------------------------------------------------------------------------------------ gpu_check.sh
@pytest.mark.slow
def test_gpu_check_runs_every_step_at_toy_sizes(data, tmp_path):
    """``benchmarks/gpu_check.sh --smoke`` on the CPU: the throughput table with its ratio to fp32 (the compile variant
    left out), then the shortened full ablation to its report, on real ISIC and PH2 images (a few of each); nnU-Net
    left out here (``tests/test_nnunet.py`` runs it in an ablation)."""
    from conftest import isic_yaml, ph2_yaml

    env = {**os.environ, "OUT": str(tmp_path / "out"), "SMOKE_SOURCE": str(isic_yaml(tmp_path / "ds", n_train=8, n_val=2)),
           "SMOKE_TARGET": str(ph2_yaml(tmp_path / "ds", n_pool=6, n_test=2)),
           "METHODS": "[scratch,supervised,diffusion,hybrid]", "PY": sys.executable}
    t = time.perf_counter()
    out = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke"], capture_output=True, text=True, timeout=900,
                         cwd=REPO_ROOT, env=env)
    wall = time.perf_counter() - t
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    r = rows(text, ("fp32", "bf16+channels-last"))
    assert list(r) == ["fp32", "bf16+channels-last"] and "bf16+channels-last+compile" not in text
    ips = {k: Printed.of(v[0]) for k, v in r.items()}
    assert_quotient(field(text, rf"ratio bf16\+channels-last/fp32: throughput ({_NUM})"), ips["bf16+channels-last"],
                    ips["fp32"], "throughput ratio")
    for k, v in r.items():
        assert_sensible_rss(Printed.of(v[1]), k)
    assert_fits(total(Printed.of(v[3]) for v in r.values()), wall, "timed iterations")
    report = (tmp_path / "out" / "ablation" / "report" / "report.md").read_text()
    for m in ("scratch", "supervised", "diffusion", "hybrid"):
        assert f"| {m} |" in report, report
    assert "**Did the generative pretext task learn anything transferable?" in report
    assert "**Before fine-tuning (budget 0).**" in report and "| supervised (supervised) |" in report
    assert "gpu_check: " in text and "no GPU" in text
