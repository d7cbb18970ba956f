"""adapt beside the fixed methods of an earlier report of the same profile, paired by labelled subset.

    python compare.py --new results.csv --earlier ../dermoscopy-standard/results.csv --zero-shot 0.912 \
        --adapt hybrid-adapt --plain hybrid

``--new`` may name several results.csv files of the same profile (runs of one ablation made in several sittings).
Both reports come from the same profile, pretraining and subsets (the same ``budget`` and ``seed`` name the same
labelled images); the methods both hold (``--plain``) must agree run for run, which the script checks and prints.
For each budget: the mean test Dice of every method, and adapt − each other method paired by seed with a 95 %
percentile bootstrap interval over the seeds (``medhybrid.core.stats.paired_bootstrap``, 10,000 resamples,
seed 0). The issue's criteria are printed as met or
not: adapt ≥ the start's zero-shot Dice − 0.005, ≥ plain fine-tuning − 0.005, and at ≤ 5 labels ≥ the best fixed
method or tied with it (the interval of the difference includes 0).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

import numpy as np

from medhybrid.core.stats import paired_bootstrap


def read(path: str) -> dict[tuple[str, int, int], float]:
    out = {}
    for r in csv.DictReader(open(path)):
        if r["budget"] in ("", "None", "all"):
            continue
        out[(r["method"], int(r["budget"]), int(r["seed"]))] = float(r["test_dice"])
    return out


def interval(d: np.ndarray, n: int = 10_000) -> tuple[float, float]:
    """The 95 % percentile interval of the mean of ``d`` (one paired difference per subset), from medhybrid's bootstrap
    with one value per seed (so only the seeds are resampled)."""
    r = paired_bootstrap([np.array([x]) for x in d], n_boot=n, seed=0)
    return r.low, r.high


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new", required=True, nargs="+",
                   help="the adapt report's results.csv; several: their runs combined, a later file's run replacing an "
                        "earlier one's of the same method, budget and seed")
    p.add_argument("--earlier", required=True)
    p.add_argument("--zero-shot", type=float, required=True)
    p.add_argument("--adapt", default="hybrid-adapt")
    p.add_argument("--plain", default="hybrid")
    p.add_argument("--fixed", nargs="*", default=["supervised", "hybrid", "supervised-fixmatch", "supervised-wise",
                                                  "hybrid-wise"])
    a = p.parse_args()
    new, old = {k: v for path in a.new for k, v in read(path).items()}, read(a.earlier)
    same = [(k, v, old[k]) for k, v in new.items() if k in old]
    worst = max((abs(v - w) for _, v, w in same), default=0.0)
    print(f"runs in both reports: {len(same)}, largest |Dice difference|: {worst:.2e}")
    runs = {**old, **new}
    by = defaultdict(dict)
    for (m, b, s), v in runs.items():
        by[(m, b)][s] = v
    budgets = sorted({b for (m, b) in by if m == a.adapt})
    print(f"\n| budget | {a.adapt} | zero-shot | " + " | ".join(a.fixed) + " |")
    print("|---|" + "---|" * (2 + len(a.fixed)))
    for b in budgets:
        ad = by[(a.adapt, b)]
        cells = [f"{np.mean(list(ad.values())):.3f} ({len(ad)})", f"{a.zero_shot:.3f}"]
        for m in a.fixed:
            v = by.get((m, b), {})
            cells.append(f"{np.mean(list(v.values())):.3f}" if v else "")
        print(f"| {b} | " + " | ".join(cells) + " |")
    print(f"\n{a.adapt} − method, paired by subset (mean [95 % bootstrap interval]):\n")
    print("| budget | " + " | ".join(["zero-shot"] + a.fixed) + " |")
    print("|---|" + "---|" * (1 + len(a.fixed)))
    verdicts = []
    for b in budgets:
        ad = by[(a.adapt, b)]
        seeds = sorted(ad)
        z = np.array([ad[s] - a.zero_shot for s in seeds])
        lo, hi = interval(z)
        # rounded first: --zero-shot is given to 4 decimals, so a kept start differs from it by less than 1e-4
        cells = [" ".join([f"{round(z.mean(), 3) + 0.0:+.3f}", f"[{round(lo, 3) + 0.0:+.3f},", f"{round(hi, 3) + 0.0:+.3f}]"])]
        best, best_mean = None, -1.0
        for m in a.fixed:
            v = by.get((m, b), {})
            common = [s for s in seeds if s in v]
            if not common:
                cells.append("")
                continue
            d = np.array([ad[s] - v[s] for s in common])
            lo, hi = interval(d)
            cells.append(f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]" + ("" if len(common) == len(seeds) else f" ({len(common)})"))
            if np.mean([v[s] for s in common]) > best_mean:
                best, best_mean, best_iv = m, float(np.mean([v[s] for s in common])), (d.mean(), lo, hi)
        print(f"| {b} | " + " | ".join(cells) + " |")
        mean = float(np.mean(list(ad.values())))
        plain = by.get((a.plain, b), {})
        pl = [ad[s] - plain[s] for s in seeds if s in plain]
        v_zero = mean >= a.zero_shot - 0.005
        v_plain = bool(pl) and float(np.mean(pl)) >= -0.005
        verdicts.append(f"- {b} label(s): ≥ zero-shot − 0.005: {'met' if v_zero else 'NOT met'} ({mean:.3f} vs "
                        f"{a.zero_shot:.3f}); ≥ plain − 0.005: {'met' if v_plain else 'NOT met'}"
                        + (f"; vs the best fixed method ({best}, {best_mean:.3f}): "
                           f"{'beats' if best_iv[1] > 0 else 'ties' if best_iv[2] >= 0 else 'LOSES'}" if b <= 5 and best else ""))
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
