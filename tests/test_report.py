"""medhybrid.report: paired comparisons on per-image scores, the best baseline, the verdict's inputs."""

from __future__ import annotations

import numpy as np
import pytest

from medhybrid.report import best_baseline, paired_comparisons, summary_table


def _rows_and_scores(gain: float, seeds=(0, 1, 2), budgets=(2, 5, 20), images=30):
    rng = np.random.default_rng(0)
    rows, scores = [], {}
    for b in budgets:
        for s in seeds:
            base = np.clip(rng.normal(0.8, 0.05, images), 0, 1)
            for m, shift in (("ref", gain), ("other", 0.0), ("weak", -0.1)):
                d = {f"img{i}": float(v + shift + rng.normal(0, 0.005)) for i, v in enumerate(base)}
                scores[(m, b, s)] = d
                rows.append({"method": m, "budget": b, "seed": s, "test_dice": float(np.mean(list(d.values())))})
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
