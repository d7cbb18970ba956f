"""medhybrid.core.stats: hierarchical bootstrap of paired differences, Holm's correction, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medhybrid.core.stats import holm, paired_bootstrap, paired_differences, pooled_bootstrap, verdict


def test_a_constant_gain_is_certain():
    r = paired_bootstrap([np.full(50, 0.02), np.full(40, 0.02)])
    assert r.mean == pytest.approx(0.02) and r.low == pytest.approx(0.02) and r.high == pytest.approx(0.02)
    assert r.p_value == 0.0 and (r.seeds, r.images) == (2, 90)
    assert verdict(r) == "beats"


def test_noise_around_zero_ties():
    rng = np.random.default_rng(1)
    r = paired_bootstrap([rng.normal(0, 0.05, 100) for _ in range(3)])
    assert r.low < 0 < r.high and r.p_value > 0.05 and verdict(r) == "ties"


def test_seed_to_seed_spread_widens_the_interval():
    """Two subsets, one helping and one hurting: many test images cannot hide that the labelled subset decides."""
    rng = np.random.default_rng(2)
    diffs = [0.10 + rng.normal(0, 0.02, 200), -0.06 + rng.normal(0, 0.02, 200)]
    r = paired_bootstrap(diffs, n_boot=4000)
    assert r.mean == pytest.approx(0.02, abs=0.005)
    assert r.low < 0 < r.high  # an images-only bootstrap would give about 0.02 ± 0.003
    assert r.low == pytest.approx(-0.06, abs=0.01) and r.high == pytest.approx(0.10, abs=0.01)


def test_a_consistent_loss_over_seeds_and_images():
    rng = np.random.default_rng(3)
    r = paired_bootstrap([-0.03 + rng.normal(0, 0.02, 100) for _ in range(5)])
    assert r.high < 0 and r.p_value < 0.01 and verdict(r) == "loses to"
    assert verdict(r, adjusted_p=0.2) == "ties"  # the family's correction can take a verdict back


def test_pooled_over_budgets_shares_the_seed_draw():
    rng = np.random.default_rng(4)
    groups = [[0.05 + rng.normal(0, 0.01, 50), 0.01 + rng.normal(0, 0.01, 50)],
              [0.03 + rng.normal(0, 0.01, 50), -0.01 + rng.normal(0, 0.01, 50)]]
    r = pooled_bootstrap(groups)
    assert r.mean == pytest.approx(np.mean([np.mean(d) for g in groups for d in g]), abs=1e-12)
    assert r.seeds == 2 and r.images == 200
    assert r.low < r.mean < r.high
    with pytest.raises(ValueError, match="same seeds"):
        pooled_bootstrap([[np.ones(3)], [np.ones(3), np.ones(3)]])


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = holm([0.2, math.nan, 0.001])
    assert adj[0] == pytest.approx(0.2) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.002)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_paired_differences_use_the_images_both_scored():
    d = paired_differences({"a": 0.9, "b": 0.8, "c": math.nan}, {"a": 0.7, "b": 0.9, "c": 0.5, "d": 0.1})
    assert d.tolist() == pytest.approx([0.2, -0.1])


def test_seed_t_test_uses_subsets_as_units():
    from medhybrid.core.stats import seed_t_test

    assert math.isnan(seed_t_test([0.02])) and math.isnan(seed_t_test([0.01, 0.01]))
    assert seed_t_test([0.10, -0.06]) > 0.5  # two subsets disagreeing: nothing to conclude
    assert seed_t_test([0.021, 0.019, 0.020, 0.022, 0.018]) < 0.001
