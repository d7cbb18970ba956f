"""medhybrid.experiments.report: paired comparisons on per-image scores, the best baseline, the verdict's inputs; what
the ablation computes once (paired statistics, samples) and the report only reads."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from medhybrid.experiments import report
from medhybrid.experiments.report import (
    ALL_BUDGETS,
    FEWEST_POOL,
    VERDICT_POOL,
    BootstrapStore,
    Budget,
    Comparison,
    Pooled,
    ReportInputsMissing,
    best_baseline,
    collect_results,
    pair_comparisons,
    paired_comparisons,
    prepare_report,
    summary_table,
    verdict_row,
    write_report,
)


def _rows_and_scores(gain: float, seeds=(0, 1, 2), budgets=(2, 5, 20), images=30):
    rng = np.random.default_rng(0)
    rows, scores = [], {}
    for b in map(Budget, budgets):
        for s in seeds:
            base = np.clip(rng.normal(0.8, 0.05, images), 0, 1)
            for m, shift in (("ref", gain), ("other", 0.0), ("weak", -0.1)):
                d = {f"img{i}": float(v + shift + rng.normal(0, 0.005)) for i, v in enumerate(base)}
                scores[(m, b, s)] = d
                rows.append({"method": m, "budget": b, "seed": s, "dice": float(np.mean(list(d.values())))})
    return rows, scores


def test_a_clear_gain_is_found_per_budget_and_pooled():
    rows, scores = _rows_and_scores(0.05)
    out = paired_comparisons(rows, scores, "ref", n_boot=500)
    labels = [(t.baseline, t.budget) for t in out]
    assert labels == [(m, b) for m in ("other", "weak") for b in (Budget(2), Budget(5), Budget(20), VERDICT_POOL, ALL_BUDGETS)]
    assert [str(b) for _, b in labels[:5]] == ["2", "5", "20", "≤ 10", "all budgets"]  # as the report prints them
    for t in out:
        want = 0.05 if t.baseline == "other" else 0.15
        assert t.mean_diff == pytest.approx(want, abs=0.003) and t.ci_low > 0
        assert t.seeds == 3 and t.images == 90 * {VERDICT_POOL: 2, ALL_BUDGETS: 3}.get(t.budget, 1)
        assert t.p_holm >= t.p_value and t.p_holm < 0.05
    table = summary_table(rows)
    assert best_baseline(table, "ref") == "other"


def test_no_gain_is_no_finding():
    rows, scores = _rows_and_scores(0.0)
    other = [t for t in paired_comparisons(rows, scores, "ref", n_boot=500) if t.baseline == "other"]
    assert all(t.ci_low < 0 < t.ci_high for t in other)
    assert all(t.p_holm > 0.05 for t in other)


def test_comparisons_pair_only_what_both_ran():
    rows, scores = _rows_and_scores(0.05, seeds=(0, 1))
    del scores[("other", Budget(5), 1)]
    out = {(t.baseline, t.budget): t for t in paired_comparisons(rows, scores, "ref", n_boot=200)}
    assert out[("other", Budget(5))].seeds == 1 and out[("other", Budget(2))].seeds == 2
    assert out[("other", VERDICT_POOL)].seeds == 1  # pooled over the seeds every pooled budget has


def _fake_run(run, method: str, budget: int, seed: int, dice: np.ndarray) -> None:
    """A scored few-shot run folder as a head leaves it: config.yaml, subset.json, state.json, eval/per_image.csv."""
    (run / "eval").mkdir(parents=True)
    with open(run / "eval" / "per_image.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "dice", "iou", "hd95"])
        w.writerows([f"img{i}", d, d, 1.0] for i, d in enumerate(dice))
    ids = [f"p{i}" for i in range(budget)]
    (run / "config.yaml").write_text(f"method: {method}\nbudget: {budget}\nseed: {seed}\n")
    (run / "subset.json").write_text(json.dumps({"budget": budget, "seed": seed, "ids": ids}))
    (run / "state.json").write_text(json.dumps({"evaluated": True, "ids": ids, "scored_on": "test",
                                                "scores": {"test_dice": float(dice.mean())}}))


def _fake_ablation(folder, name: str, iterations: int, gains: dict[str, float], seeds=(0, 1, 2), budgets=(2, 5, 20),
                   pretrain: dict[str, str] | None = None):
    """An ablation folder as the runner leaves it with MLflow off: each fine-tune's recorded subset and scores."""
    from medhybrid.experiments.ablation import AblationConfig

    rng = np.random.default_rng(iterations)
    for b in budgets:
        for s in seeds:
            base = np.clip(rng.normal(0.75, 0.05, 20), 0, 1)
            for m, gain in gains.items():
                _fake_run(folder / name / "finetune" / m / f"b{b}-s{s}", m, b, s,
                          np.clip(base + gain + rng.normal(0, 0.002, 20), 0, 1))
    modes = pretrain or {m: "hybrid" if m != "supervised" else "supervised" for m in gains}
    return AblationConfig(name=name, source="isic2018", target="ph2", output_dir=folder / name, mlflow={"enabled": False},
                          methods={m: {"pretrain": modes[m]} for m in gains}, budgets=list(budgets), seeds=list(seeds),
                          pretrain={"train": {"epochs": iterations // 10, "epoch_length": 10}})


def test_length_curve_pairs_the_shared_subsets_across_lengths(tmp_path):
    """The gap that grows with pretraining is found, on the subsets every length ran, with the recorded scores."""
    from medhybrid.experiments.report import write_length_curve

    cfgs = [_fake_ablation(tmp_path, "long", 1000, {"supervised": 0.0, "hybrid": 0.06}),
            _fake_ablation(tmp_path, "short", 200, {"supervised": 0.0, "hybrid": 0.0}, seeds=(0, 1, 2, 3)),
            _fake_ablation(tmp_path, "mid", 500, {"supervised": 0.0, "hybrid": 0.03}, budgets=(2, 5))]
    paths = write_length_curve(cfgs, tmp_path / "curve", n_boot=300)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [(int(r["iterations"]), r["method"]) for r in rows] == [(it, m) for it in (200, 500, 1000)
                                                                   for m in ("supervised", "hybrid")]
    hybrid = {int(r["iterations"]): r for r in rows if r["method"] == "hybrid"}
    for it, gain in ((200, 0.0), (500, 0.03), (1000, 0.06)):
        assert float(hybrid[it]["mean_diff"]) == pytest.approx(gain, abs=0.003)
        assert int(hybrid[it]["seeds"]) == 3 and int(hybrid[it]["images"]) == 2 * 3 * 20  # budgets 2, 5 x seeds 0-2
    assert float(hybrid[1000]["ci_low"]) > 0 and float(hybrid[1000]["p_holm"]) < 0.05
    assert float(hybrid[200]["ci_low"]) < 0 < float(hybrid[200]["ci_high"])
    sup = {int(r["iterations"]): float(r["mean_dice"]) for r in rows if r["method"] == "supervised"}
    long_runs = [r for r in csv.DictReader(open(tmp_path / "long" / "finetune" / "supervised" / "b2-s0" / "eval" / "per_image.csv"))]
    assert 0.6 < sup[1000] < 0.9 and len(long_runs) == 20
    md = paths["markdown"].read_text()
    assert "200 it." in md and "1000 it." in md and "budgets [2, 5] × seeds [0, 1, 2]" in md and paths["plot"].stat().st_size > 0
    with pytest.raises(ValueError, match="baseline 'mdm'"):
        write_length_curve(cfgs, tmp_path / "c2", baseline="mdm")


def test_a_profile_reports_only_its_methods(tmp_path):
    """Runs of other methods in the same folder (an earlier profile's) stay out of a profile's report."""
    cfg = _fake_ablation(tmp_path, "abl", 200, {"supervised": 0.0, "hybrid": 0.02, "mdm": -0.1})
    narrow = cfg.model_copy(update={"methods": {m: cfg.methods[m] for m in ("supervised", "hybrid")}, "reference": "hybrid"})
    prepare_report(narrow)
    paths = write_report(narrow, tmp_path / "report")
    assert {r["method"] for r in csv.DictReader(open(paths["results"]))} == {"supervised", "hybrid"}
    md = paths["markdown"].read_text()
    assert "| mdm |" not in md and "**Verdict at ≤ 10 labels: `hybrid` " in md and "best other method, `supervised`" in md


def test_the_report_names_runs_whose_mlflow_records_still_wait(tmp_path):
    """A run folder with an outbox (records kept while the tracking server was down) is named in the report, with
    the command that sends them; a synced ablation says nothing."""
    from medhybrid.core import tracking

    cfg = _fake_ablation(tmp_path, "abl", 200, {"supervised": 0.0, "hybrid": 0.02})
    prepare_report(cfg)
    assert "Not yet in MLflow" not in write_report(cfg, tmp_path / "r1")["markdown"].read_text()
    waiting = next((cfg.folder / "finetune" / "hybrid").iterdir())
    tracking.Outbox(waiting).append({"op": "update_run", "run_id": "r", "status": "RUNNING"})
    md = write_report(cfg, tmp_path / "r2")["markdown"].read_text()
    assert f"Not yet in MLflow (the tracking server was unreachable; `medhybrid sync {cfg.folder}` sends them): " \
           f"`finetune/hybrid/{waiting.name}`." in md


def test_budgets_and_pools_are_typed_keys():
    assert str(Budget(5)) == "5" and sorted([Budget(20), Budget(2)]) == [Budget(2), Budget(20)]
    assert (str(VERDICT_POOL), str(FEWEST_POOL), str(ALL_BUDGETS)) == ("≤ 10", "≤ 5", "all budgets")
    assert VERDICT_POOL.covers(Budget(10)) and not VERDICT_POOL.covers(Budget(20)) and ALL_BUDGETS.covers(Budget(160))
    assert Pooled(10) == VERDICT_POOL != ALL_BUDGETS and Budget(10) != VERDICT_POOL
    c = Comparison("b", VERDICT_POOL, 3, 60, 0.01, -0.02, 0.03, float("nan"))
    assert Comparison.from_json(json.loads(json.dumps(c.to_json()))).budget == VERDICT_POOL


def test_the_verdict_reads_the_pooled_row_else_a_single_small_budget():
    def row(budget, baseline="b"):
        return Comparison(baseline, budget, 3, 60, 0.0, -0.1, 0.1, 0.5)

    pooled = [row(Budget(2)), row(Budget(5)), row(VERDICT_POOL), row(ALL_BUDGETS), row(VERDICT_POOL, "other")]
    assert verdict_row(pooled, "b") is pooled[2] and verdict_row(pooled, "b", ALL_BUDGETS) is pooled[3]
    single = [row(Budget(5)), row(Budget(20)), row(ALL_BUDGETS)]
    assert verdict_row(single, "b") is single[0]  # a single small budget is its own pool
    assert verdict_row(pooled[:2], "b") is None and verdict_row(pooled, "nobody") is None


def test_runs_are_named_by_what_they_recorded_not_by_their_folder(tmp_path, caplog):
    """Method, budget and seed come from the run's config.yaml and subset.json, whatever its folder is called."""
    cfg = _fake_ablation(tmp_path, "abl", 200, {"supervised": 0.0, "hybrid": 0.02}, seeds=(0,), budgets=(2,))
    _fake_run(cfg.folder / "finetune" / "hybrid" / "renamed-by-hand", "hybrid", 5, 7, np.full(20, 0.5))
    tagged = cfg.folder / "finetune" / "supervised" / "b5-s1"  # a head whose config names the method in its run's tags
    _fake_run(tagged, "supervised", 5, 1, np.full(20, 0.6))
    (tagged / "config.yaml").write_text("tags: {method: supervised, budget: '5', seed: '1'}\nseed: 1\n")
    unrecorded = cfg.folder / "finetune" / "hybrid" / "b5-s2"
    _fake_run(unrecorded, "hybrid", 5, 2, np.full(20, 0.6))
    (unrecorded / "subset.json").unlink()
    with caplog.at_level(logging.WARNING, logger="medhybrid"):
        rows = collect_results(cfg, None)
    assert [(r["method"], r["budget"], r["seed"]) for r in rows] == [
        ("supervised", Budget(2), 0), ("supervised", Budget(5), 1), ("hybrid", Budget(2), 0), ("hybrid", Budget(5), 7)]
    assert rows[-1]["dice"] == pytest.approx(0.5)
    assert f"{unrecorded} is scored but records no subset.json" in caplog.text  # left out, and said so


def test_the_report_reads_the_statistics_the_ablation_stored_and_computes_nothing(tmp_path, monkeypatch):
    """prepare_report bootstraps every pair once into the ablation folder; write_report reads them (the same numbers
    as computing them), refuses before writing anything when they are missing or stale, and writes only its files."""
    cfg = _fake_ablation(tmp_path, "abl", 200, {"supervised": 0.0, "hybrid": 0.03, "mdm": -0.05})
    with pytest.raises(ReportInputsMissing, match="hybrid − supervised, hybrid − mdm"):
        write_report(cfg, tmp_path / "r0")
    assert not (tmp_path / "r0").exists()

    out = prepare_report(cfg)
    assert out == {"bootstrap": cfg.folder / "paired-bootstrap.json", "samples": None}
    rows = report.report_rows(cfg, None)
    scores = report.per_image_scores(cfg, rows)
    stored = BootstrapStore(cfg.folder).get("hybrid", "supervised", scores)
    fresh = pair_comparisons(scores, "hybrid", "supervised")
    assert json.dumps([c.to_json() for c in stored]) == json.dumps([c.to_json() for c in fresh])  # bit-identical

    def no_bootstrap(*a, **k):
        raise AssertionError("the bootstrap ran again")

    monkeypatch.setattr(report, "pair_comparisons", no_bootstrap)
    before = {p: p.stat().st_mtime_ns for p in cfg.folder.rglob("*")}
    prepare_report(cfg)  # all there: nothing computed
    paths = write_report(cfg, tmp_path / "r1")
    assert {p: p.stat().st_mtime_ns for p in cfg.folder.rglob("*")} == before
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == ["dice_vs_labels.png", "report.md", "results.csv",
                                                                   "summary.csv"]
    md = paths["markdown"].read_text()
    monkeypatch.undo()
    want = verdict_row(paired_comparisons(rows, scores, "hybrid"), "supervised")
    assert f"`supervised`**: {want.mean_diff:+.3f} test Dice, 95 % CI [{want.ci_low:+.3f}, {want.ci_high:+.3f}]" in md
    assert "| mdm | ≤ 10 | 3 | 120 |" in md and "| mdm | all budgets | 3 | 180 |" in md

    # a resumed ablation adds a seed: the hybrid pairs are stale, the report says so; prepare recomputes those only
    for m, gain in (("supervised", 0.0), ("hybrid", 0.03)):
        _fake_run(cfg.folder / "finetune" / m / "b2-s3", m, 2, 3, np.full(20, 0.7 + gain))
    with pytest.raises(ReportInputsMissing, match="hybrid − supervised"):
        write_report(cfg, tmp_path / "r2")
    calls = []
    monkeypatch.setattr(report, "pair_comparisons", lambda s, r, b, n: calls.append((r, b)) or [])
    prepare_report(cfg)
    assert calls == [("hybrid", "supervised"), ("hybrid", "mdm")]  # mdm's scores changed nowhere, but its pair's did


def test_samples_are_drawn_once_by_the_ablation_and_copied_beside_the_report(tmp_path, monkeypatch):
    """The pretext line shows the diffusion pretraining's samples: drawn once into the ablation folder by
    prepare_report (not by write_report), copied beside each report; an older version's grid is taken over."""
    import medhybrid.workflows.sampling as sampling

    gains = {"scratch": 0.0, "diffusion": 0.01, "hybrid": 0.03}
    cfg = _fake_ablation(tmp_path, "abl", 200, gains, pretrain={"scratch": "none", "diffusion": "diffusion",
                                                                "hybrid": "hybrid"})
    ckpt = cfg.folder / "pretrain" / "diffusion" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    drawn = []

    def fake_grid(checkpoint, out, num, steps, seed):
        drawn.append((checkpoint, num, steps, seed))
        out.write_bytes(b"png")

    monkeypatch.setattr(sampling, "sample_to_grid", fake_grid)
    prepare_report(cfg)
    grid = cfg.folder / "samples-diffusion.png"
    with pytest.raises(ReportInputsMissing, match="samples of the diffusion pretraining"):  # removed: refused, not drawn
        grid.rename(tmp_path / "kept.png")
        write_report(cfg, tmp_path / "r0")
    (tmp_path / "kept.png").rename(grid)
    assert drawn == [(ckpt, 16, 18, 0)]
    md = write_report(cfg, tmp_path / "r1")["markdown"].read_text()
    assert "Samples of the `diffusion` pretraining (`medhybrid sample`, 18 steps):\n\n![samples](samples-diffusion.png)" in md
    assert (tmp_path / "r1" / "samples-diffusion.png").read_bytes() == b"png" and "`diffusion` − `scratch` +0.01" in md
    prepare_report(cfg)
    assert len(drawn) == 1  # already there

    grid.unlink()  # an ablation folder an older version wrote: its grid is in report/
    (cfg.folder / "report").mkdir()
    (cfg.folder / "report" / "samples-diffusion.png").write_bytes(b"old png")
    prepare_report(cfg)
    assert len(drawn) == 1 and grid.read_bytes() == b"old png"


def test_the_wall_time_table_leaves_out_methods_that_ran_before_it_was_recorded(tmp_path):
    from types import SimpleNamespace

    from medhybrid.experiments.report import _timing_lines

    inv = [{"device": "CPU (2 cores)", "wall_s": 900.0, "finished": True, "methods": {
        "old": {"pretrain_s": 0.001, "train_s": 0.002, "eval_s": 0.0},  # every run skipped as finished
        "new": {"pretrain_s": 480.0, "train_s": 300.0, "eval_s": 60.0}}}]
    (tmp_path / "timings.json").write_text(json.dumps({"invocations": inv}))
    lines = _timing_lines(SimpleNamespace(folder=tmp_path, methods={"old": None, "new": None}))
    assert "| new | 8.0 | 5.0 | 1.0 | 14.0 |" in lines and not any(line.startswith("| old |") for line in lines)
    assert lines[-1].startswith("Not in this table: `old`, whose runs had all finished before")
    assert _timing_lines(SimpleNamespace(folder=tmp_path / "none", methods={})) == []
