"""Paired statistics for comparing two methods on the same labelled subsets and the same test images.

A comparison is a set of paired per-image differences ``d[s][i] = dice_ref(s, i) - dice_base(s, i)`` for each seed
``s`` (one few-shot subset, both methods fine-tuned on it) and each evaluated image ``i``. Two sources of chance
lie in it: which images were labelled (the seed) and which images were tested. The hierarchical bootstrap
(Davison & Hinkley 1997, sec. 3.8; Saravanan et al. 2020) resamples both: seeds with replacement, then images
with replacement within each drawn seed. Its percentile interval is the 95 % confidence interval of the mean
difference (and twice the smaller tail beyond 0 a bootstrap p-value). With a handful of seeds the bootstrap sees
few distinct subsets and understates their spread, so the test of a difference is a paired t-test on the
per-subset mean differences (:func:`seed_t_test`), and Holm's step-down method (Holm 1979) corrects a family of
them for the number of comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import ttest_1samp


@dataclass
class PairedResult:
    """The mean paired difference of a comparison, its bootstrap interval and p-value."""

    mean: float
    low: float
    high: float
    p_value: float
    seeds: int
    images: int


def bootstrap_replicates(diffs: Sequence[np.ndarray], n_boot: int = 2000, rng: np.random.Generator | None = None,
                         seed_draws: np.ndarray | None = None) -> np.ndarray:
    """``n_boot`` hierarchical bootstrap replicates of the mean paired difference: seeds drawn with replacement
    (``seed_draws``, shape ``(n_boot, S)``, to share one draw between comparisons), then each drawn seed's images
    with replacement; a replicate is the mean over its drawn seeds of their resampled image means."""
    rng = rng if rng is not None else np.random.default_rng(0)
    s = len(diffs)
    if s == 0 or any(len(d) == 0 for d in diffs):
        raise ValueError("every seed needs at least one paired image difference")
    # each seed's resampled image means, one per replicate: (S, n_boot)
    per_seed = np.stack([np.asarray(d, dtype=np.float64)[rng.integers(0, len(d), (n_boot, len(d)))].mean(1) for d in diffs])
    draws = seed_draws if seed_draws is not None else rng.integers(0, s, (n_boot, s))
    return per_seed[draws, np.arange(n_boot)[:, None]].mean(1)


def summarise(diffs: Sequence[np.ndarray], replicates: np.ndarray, level: float = 0.95) -> PairedResult:
    """Mean difference (mean over seeds of the image means), percentile interval and two-sided bootstrap p-value."""
    mean = float(np.mean([np.mean(d) for d in diffs]))
    a = (1 - level) / 2
    low, high = (float(v) for v in np.quantile(replicates, [a, 1 - a]))
    tail = min(float(np.mean(replicates <= 0)), float(np.mean(replicates >= 0)))
    p = min(1.0, 2 * tail) if np.ptp(replicates) > 0 else (1.0 if mean == 0 else 0.0)
    return PairedResult(mean, low, high, p, len(diffs), int(sum(len(d) for d in diffs)))


def paired_bootstrap(diffs: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> PairedResult:
    """:func:`bootstrap_replicates` and :func:`summarise` of one comparison."""
    return summarise(diffs, bootstrap_replicates(diffs, n_boot, np.random.default_rng(seed)), level)


def pooled_bootstrap(groups: Sequence[Sequence[np.ndarray]], n_boot: int = 2000, seed: int = 0, level: float = 0.95
                     ) -> PairedResult:
    """One comparison pooled over groups (budgets) that share their seeds: the seed draw is shared by every group
    (the same labelled-subset seeds), images are drawn within each (group, seed); a replicate is the mean of the
    groups' replicates. ``groups[g][s]``: the paired differences of group ``g`` and seed ``s`` (same seed order)."""
    rng = np.random.default_rng(seed)
    s = len(groups[0])
    if any(len(g) != s for g in groups):
        raise ValueError("pooled groups must hold the same seeds")
    draws = rng.integers(0, s, (n_boot, s))
    reps = np.mean([bootstrap_replicates(g, n_boot, rng, draws) for g in groups], axis=0)
    res = summarise([d for g in groups for d in g], reps, level)
    res.mean = float(np.mean([np.mean([np.mean(d) for d in g]) for g in groups]))
    res.seeds = s
    return res


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; NaN entries are left out of the family and stay NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    idx = [i for i in np.argsort(p) if not np.isnan(p[i])]
    out = np.full(len(p), np.nan)
    running, m = 0.0, len(idx)
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def paired_differences(ref: Mapping[str, float], base: Mapping[str, float]) -> np.ndarray:
    """``ref - base`` on the images both scored (ids sorted); images with a NaN score on either side are left out."""
    ids = sorted(set(ref) & set(base))
    d = np.array([ref[i] - base[i] for i in ids], dtype=np.float64)
    return d[~np.isnan(d)]


def seed_t_test(unit_diffs: Sequence[float]) -> float:
    """Two-sided paired t-test of mean differences, one per labelled subset (the unit that varies most between
    repeats); NaN with fewer than 2 units or none of them differing."""
    d = np.asarray(unit_diffs, dtype=np.float64)
    if len(d) < 2 or np.ptp(d) == 0:
        return math.nan
    return float(ttest_1samp(d, 0.0).pvalue)


def verdict(result: PairedResult, alpha: float = 0.05, adjusted_p: float | None = None) -> str:
    """``beats`` / ``loses to`` when the interval excludes 0 and the (adjusted) p-value is below ``alpha``, else ``ties``."""
    p = result.p_value if adjusted_p is None else adjusted_p
    if result.low > 0 and p < alpha:
        return "beats"
    if result.high < 0 and p < alpha:
        return "loses to"
    return "ties"


__all__ = ["bootstrap_replicates", "holm", "paired_bootstrap", "paired_differences", "PairedResult",
           "pooled_bootstrap", "seed_t_test", "summarise", "verdict"]
