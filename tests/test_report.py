"""medhybrid.experiments.report: paired comparisons on per-image scores, the best baseline, the verdict's inputs."""

from __future__ import annotations

import numpy as np
import pytest

from medhybrid.experiments.report import best_baseline, paired_comparisons, summary_table


def _rows_and_scores(gain: float, seeds=(0, 1, 2), budgets=(2, 5, 20), images=30):
    rng = np.random.default_rng(0)
    rows, scores = [], {}
    for b in budgets:
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
    labels = [(t["baseline"], t["budget"]) for t in out]
    assert labels == [(m, b) for m in ("other", "weak") for b in (2, 5, 20, "≤ 10", "all budgets")]
    for t in out:
        want = 0.05 if t["baseline"] == "other" else 0.15
        assert t["mean_diff"] == pytest.approx(want, abs=0.003) and t["ci_low"] > 0
        assert t["seeds"] == 3 and t["images"] == 90 * {"≤ 10": 2, "all budgets": 3}.get(t["budget"], 1)
        assert t["p_holm"] >= t["p_value"] and t["p_holm"] < 0.05
    table = summary_table(rows)
    assert best_baseline(table, "ref") == "other"


def test_no_gain_is_no_finding():
    rows, scores = _rows_and_scores(0.0)
    other = [t for t in paired_comparisons(rows, scores, "ref", n_boot=500) if t["baseline"] == "other"]
    assert all(t["ci_low"] < 0 < t["ci_high"] for t in other)
    assert all(t["p_holm"] > 0.05 for t in other)


def test_comparisons_pair_only_what_both_ran():
    rows, scores = _rows_and_scores(0.05, seeds=(0, 1))
    del scores[("other", 5, 1)]
    out = {(t["baseline"], t["budget"]): t for t in paired_comparisons(rows, scores, "ref", n_boot=200)}
    assert out[("other", 5)]["seeds"] == 1 and out[("other", 2)]["seeds"] == 2
    assert out[("other", "≤ 10")]["seeds"] == 1  # pooled over the seeds every pooled budget has


def _fake_ablation(folder, name: str, iterations: int, gains: dict[str, float], seeds=(0, 1, 2), budgets=(2, 5, 20)):
    """An ablation folder as the runner leaves it with MLflow off: each fine-tune's state.json and per-image CSV."""
    import csv
    import json

    from medhybrid.experiments.ablation import AblationConfig

    rng = np.random.default_rng(iterations)
    for b in budgets:
        for s in seeds:
            base = np.clip(rng.normal(0.75, 0.05, 20), 0, 1)
            for m, gain in gains.items():
                run = folder / name / "finetune" / m / f"b{b}-s{s}"
                (run / "eval").mkdir(parents=True)
                dice = np.clip(base + gain + rng.normal(0, 0.002, 20), 0, 1)
                with open(run / "eval" / "per_image.csv", "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["id", "dice", "iou", "hd95"])
                    w.writerows([f"img{i}", d, d, 1.0] for i, d in enumerate(dice))
                (run / "state.json").write_text(json.dumps({"evaluated": True, "ids": [f"p{i}" for i in range(b)],
                                                            "scored_on": "test", "scores": {"test_dice": float(dice.mean())}}))
    return AblationConfig(name=name, source="isic2018", target="ph2", output_dir=folder / name, mlflow={"enabled": False},
                          methods={m: {"pretrain": "hybrid" if m != "supervised" else "supervised"} for m in gains},
                          pretrain={"train": {"epochs": iterations // 10, "epoch_length": 10}})


def test_length_curve_pairs_the_shared_subsets_across_lengths(tmp_path):
    """The gap that grows with pretraining is found, on the subsets every length ran, with the recorded scores."""
    import csv

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
    import csv

    from medhybrid.experiments.report import write_report

    cfg = _fake_ablation(tmp_path, "abl", 200, {"supervised": 0.0, "hybrid": 0.02, "mdm": -0.1})
    narrow = cfg.model_copy(update={"methods": {m: cfg.methods[m] for m in ("supervised", "hybrid")}, "reference": "hybrid"})
    paths = write_report(narrow, tmp_path / "report")
    assert {r["method"] for r in csv.DictReader(open(paths["results"]))} == {"supervised", "hybrid"}
    md = paths["markdown"].read_text()
    assert "| mdm |" not in md and "**Verdict at ≤ 10 labels: `hybrid` " in md and "best other method, `supervised`" in md


def test_the_report_names_runs_whose_mlflow_records_still_wait(tmp_path):
    """A run folder with an outbox (records kept while the tracking server was down) is named in the report, with
    the command that sends them; a synced ablation says nothing."""
    from medhybrid.core import tracking
    from medhybrid.experiments.report import write_report

    cfg = _fake_ablation(tmp_path, "abl", 200, {"supervised": 0.0, "hybrid": 0.02})
    assert "Not yet in MLflow" not in write_report(cfg, tmp_path / "r1")["markdown"].read_text()
    waiting = next((cfg.folder / "finetune" / "hybrid").iterdir())
    tracking.Outbox(waiting).append({"op": "update_run", "run_id": "r", "status": "RUNNING"})
    md = write_report(cfg, tmp_path / "r2")["markdown"].read_text()
    assert f"Not yet in MLflow (the tracking server was unreachable; `medhybrid sync {cfg.folder}` sends them): " \
           f"`finetune/hybrid/{waiting.name}`." in md


def test_the_wall_time_table_leaves_out_methods_that_ran_before_it_was_recorded(tmp_path):
    import json
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
