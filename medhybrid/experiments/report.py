"""Ablation report: mean ± std test Dice per method and budget, Dice against the number of labels, and the paired
difference reference (hybrid) − each baseline on the same test images and labelled subsets, with a 95 % confidence
interval from a hierarchical bootstrap over seeds and images and Holm-corrected p-values (:mod:`medhybrid.experiments.stats`),
ending in one verdict: does the reference beat, tie or lose to the best other method at ≤ 10 labels?

The numbers are read back from the MLflow child runs of the ablation's parent run (or, with MLflow
off, from the fine-tune folders' ``state.json``), and the per-image scores from each run's
``eval/per_image.csv`` (its folder, else its MLflow artifact), so the report shows exactly what was recorded.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from medhybrid.core import runs, tracking
from medhybrid.engines.fit import TrainConfig
from medhybrid.experiments.stats import holm, paired_bootstrap, paired_differences, pooled_bootstrap, seed_t_test, verdict


def collect_results(cfg, parent_run_id: str | None) -> list[dict]:
    """One row per finished, evaluated fine-tune: method, budget, seed, its ``dice``, ``iou`` and ``hd95`` on the set
    the ablation scores on (``cfg.scored_on``), run id and folder. Read from the run folders' ``state.json`` (which
    hold every score, whether or not the tracking server got it); from the parent's MLflow runs when the folders are
    not here (a report rebuilt on another machine)."""
    rows = []
    on = cfg.scored_on
    for st in sorted(Path(cfg.folder / "finetune").glob("*/*/state.json")):
        s = json.loads(st.read_text())
        scored_on, summary = runs.scores(s)
        if scored_on != on:
            continue
        method, sd = st.parent.parent.name, st.parent.name.split("-")[1]
        scores = {k: summary.get(f"{on}_{k}", math.nan) for k in ("dice", "iou", "hd95")}
        rows.append({"method": method, "budget": len(s.get("ids", [])), "seed": int(sd[1:]), **scores,
                     "run_id": s.get("mlflow_run_id", ""), "folder": str(st.parent)})
    if not rows and parent_run_id:
        for r in tracking.child_runs(tracking.client(cfg.mlflow), parent_run_id, [tracking.experiment_id(cfg.mlflow)]):
            m, t = r.data.metrics, r.data.tags
            if f"{on}_dice" not in m:
                continue
            rows.append({"method": t.get("method"), "budget": int(t["budget"]), "seed": int(t["seed"]),
                         "dice": m[f"{on}_dice"], "iou": m.get(f"{on}_iou", math.nan),
                         "hd95": m.get(f"{on}_hd95", math.nan), "run_id": r.info.run_id,
                         "folder": t.get("medhybrid.folder", "")})
    order = {m: i for i, m in enumerate(cfg.methods)}
    return sorted(rows, key=lambda r: (order.get(r["method"], 99), r["budget"], r["seed"]))


def _nnunet_lines(cfg, rows: list[dict]) -> list[str]:
    """What the nnunet rows ran: nnU-Net's version, configuration, trainer (a shortened schedule says so) and size."""
    ran = sorted({r["method"] for r in rows if cfg.methods.get(r["method"]) and cfg.methods[r["method"]].head == "nnunet"})
    if not ran:
        return []
    from importlib.metadata import version

    from medhybrid.experiments.nnunet import NnunetConfig

    defaults = NnunetConfig.model_fields
    trainer = cfg.nnunet.get("trainer", defaults["trainer"].default)
    configuration = cfg.nnunet.get("configuration", defaults["configuration"].default)
    resolution = cfg.nnunet.get("resolution", cfg.resolution)
    short = "" if trainer == "nnUNetTrainer" else (
        " — a shortened schedule, not nnU-Net's default 1000 epochs of 250 iterations: these rows are nnU-Net's pipeline "
        "(planning, augmentation, network) at this profile's compute, not its full-length result")
    return ["", f"`{'`, `'.join(ran)}`: nnU-Net v2 ({version('nnunetv2')}), `{configuration}` configuration planned by "
            f"nnU-Net on the labelled subset, trained from scratch on all its cases (fold `all`) with `{trainer}`{short}; "
            f"images exported at {resolution} px on the longer side (the other methods' input size), predictions "
            "resized to each image's native grid and scored like every other method."]


def zero_shot_scores(cfg) -> dict[str, tuple[list[str], float]]:
    """Budget 0 (:func:`medhybrid.experiments.ablation.zero_shot_step`): per pretraining that has a scored zero-shot folder, the
    methods of ``cfg`` that start from it and its Dice on the set the ablation scores on."""
    out: dict[str, tuple[list[str], float]] = {}
    for method in cfg.methods:
        key = cfg.pretraining_of(method)
        scored_on, scores = runs.scores(runs.read_state(cfg.folder / "zero-shot" / key))
        if scored_on == cfg.scored_on and f"{scored_on}_dice" in scores:
            out.setdefault(key, ([], scores[f"{scored_on}_dice"]))[0].append(method)
    return out


def _zero_shot_lines(cfg, table: dict) -> list[str]:
    """The pretrainings' own mask heads before any fine-tuning, beside what their fewest-label fine-tune reaches."""
    zs = zero_shot_scores(cfg)
    if not zs:
        return []
    lines = ["", f"**Before fine-tuning (budget 0).** Dice of each pretraining's own mask head on the same "
             f"{'test' if cfg.scored_on == 'test' else 'development'} images, with no target label: what transfers as it "
             "is; the table above adds what fine-tuning on a few labels brings.", "",
             "| pretraining (methods using it) | budget 0 | fewest labels, fine-tuned |", "|---|---|---|"]
    for key, (methods, dice) in zs.items():
        tuned = sorted((b, mu) for (m, b), (mu, _, _) in table.items() if m == key and b)
        after = f"{tuned[0][1]:.3f} at {tuned[0][0]}" if tuned else "–"
        lines.append(f"| {key} ({', '.join(methods)}) | {dice:.3f} | {after} |")
    return lines


def unsynced(folder: Path) -> list[Path]:
    """Run folders under ``folder`` whose MLflow records still wait in their outbox (``medhybrid sync`` sends them)."""
    return sorted(p.parent for p in Path(folder).rglob(tracking.OUTBOX))


def summary_table(rows: list[dict]) -> dict[tuple[str, int], tuple[float, float, int]]:
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r["dice"])
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def per_image_scores(cfg, rows: list[dict]) -> dict[tuple[str, int, int], dict[str, float]]:
    """Per-image Dice of every row's run, keyed by (method, budget, seed): ``eval/per_image.csv`` in the run's folder,
    else the run's MLflow artifact of that name. Rows whose scores cannot be found are left out."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="medhybrid-report-") as downloads:  # artifacts fetched for this report only
        for r in rows:
            path = Path(r.get("folder") or "") / "eval" / "per_image.csv"
            if not path.is_file() and r.get("run_id"):
                try:
                    path = Path(tracking.client(cfg.mlflow).download_artifacts(r["run_id"], "eval/per_image.csv",
                                                                                str(Path(downloads) / r["run_id"])))
                except Exception:  # an artifact store that cannot be reached: the row has no per-image scores
                    continue
            if path.is_file():
                with open(path, newline="") as fh:
                    out[(r["method"], r["budget"], r["seed"])] = {row["id"]: float(row["dice"]) for row in csv.DictReader(fh)}
    return out


POOLED_MAX_BUDGET = 10
"""The verdict's scope: budgets up to this many labels, where the choice of pretraining matters most."""

FEWEST_MAX_BUDGET = 5
"""A second pooled row (in the detail family): the fewest labels, where unlabelled images are meant to help most."""


def paired_comparisons(rows: list[dict], scores: dict, reference: str, n_boot: int = 2000) -> list[dict]:
    """reference − baseline on the same images and labelled subsets: per budget, pooled over budgets ≤
    :data:`POOLED_MAX_BUDGET`, and pooled over all budgets. Each: seeds, images, mean paired difference, hierarchical
    bootstrap 95 % CI (seeds and images resampled), the paired t-test over labelled subsets (the per-seed mean
    differences; pooled rows: per (budget, seed)) and its p-value Holm-adjusted within its family: the verdict's family
    is the "≤ 10" rows, one per baseline (the question the report answers), and the per-budget and "all budgets"
    rows are a second family (the detail)."""
    methods = sorted({r["method"] for r in rows} - {reference}, key=[r["method"] for r in rows].index)
    budgets = sorted({r["budget"] for r in rows})
    out = []
    for m in methods:
        per_budget: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        for b in budgets:
            seeds = sorted(s for (mm, bb, s) in scores if mm == reference and bb == b and (m, b, s) in scores)
            diffs = [paired_differences(scores[(reference, b, s)], scores[(m, b, s)]) for s in seeds]
            if not diffs or any(len(d) == 0 for d in diffs):
                continue
            per_budget[b] = (seeds, diffs)
            out.append({"baseline": m, "budget": b, **_row(paired_bootstrap(diffs, n_boot), [float(np.mean(d)) for d in diffs])})
        pools = [(f"≤ {POOLED_MAX_BUDGET}", [b for b in per_budget if b <= POOLED_MAX_BUDGET]), ("all budgets", list(per_budget))]
        fewest = [b for b in per_budget if b <= FEWEST_MAX_BUDGET]
        if fewest != pools[0][1]:  # only when it pools other budgets than the verdict's row
            pools.insert(1, (f"≤ {FEWEST_MAX_BUDGET}", fewest))
        for label, bs in pools:
            common = sorted(set.intersection(*(set(per_budget[b][0]) for b in bs))) if len(bs) > 1 else []
            if not common:
                continue
            groups = [[per_budget[b][1][per_budget[b][0].index(s)] for s in common] for b in bs]
            units = [float(np.mean(d)) for g in groups for d in g]
            out.append({"baseline": m, "budget": label, **_row(pooled_bootstrap(groups, n_boot), units)})
    for primary in (True, False):  # two families: the verdict's pooled "≤ 10" rows, and every other row
        family = [r for r in out if (r["budget"] == f"≤ {POOLED_MAX_BUDGET}") == primary]
        for row, adj in zip(family, holm([r["p_value"] for r in family]), strict=True):
            row["p_holm"] = adj
    return out


def _row(res, units: list[float]) -> dict:
    """A table row: the bootstrap's mean and interval, and the paired t-test over ``units`` (per-subset mean diffs)."""
    res.p_value = seed_t_test(units)
    return {"seeds": res.seeds, "images": res.images, "mean_diff": res.mean, "ci_low": res.low, "ci_high": res.high,
            "p_value": res.p_value, "result": res}


def _p(p: float) -> str:
    return "–" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3g}"


def best_baseline(table: dict, reference: str, max_budget: int = POOLED_MAX_BUDGET) -> str | None:
    """The other method with the highest mean Dice over the budgets ≤ ``max_budget`` that the reference also ran."""
    budgets = sorted({b for (m, b) in table if m == reference and b <= max_budget})
    means = {m: np.mean([table[(m, b)][0] for b in budgets]) for m in {m for (m, _) in table} - {reference}
             if budgets and all((m, b) in table for b in budgets)}
    return max(means, key=means.get) if means else None


def write_report(cfg, out_dir: Path, parent_run_id: str | None = None) -> dict[str, Path]:
    """Write ``results.csv``, ``summary.csv``, ``report.md`` and ``dice_vs_labels.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in collect_results(cfg, parent_run_id) if r["method"] in cfg.methods]  # a profile's selection
    table = summary_table(rows)
    methods = [m for m in cfg.methods if any(k[0] == m for k in table)]
    budgets = sorted({k[1] for k in table})
    _write_tables(out_dir, cfg.scored_on, rows, table, methods)

    has_ref = any(r["method"] == cfg.reference for r in rows)
    scores = per_image_scores(cfg, rows)
    tests = paired_comparisons(rows, scores, cfg.reference) if has_ref else []
    best_other = best_baseline(table, cfg.reference) if has_ref else None
    score = "test Dice" if cfg.evaluate_on == "test" else "development Dice"
    _plot(out_dir / "dice_vs_labels.png", cfg, table, methods, budgets, tests, best_other, score)
    lines = (_results_lines(cfg, rows, table, methods, budgets, parent_run_id) + _nnunet_lines(cfg, rows)
             + _zero_shot_lines(cfg, table)
             + _verdict_lines(cfg, tests, best_other, score) + _pretext_lines(cfg, rows, scores, out_dir, score)
             + _comparison_lines(cfg, tests, score) + _timing_lines(cfg) + ["", "![Dice against labels](dice_vs_labels.png)", ""])
    (out_dir / "report.md").write_text("\n".join(lines))
    return {"markdown": out_dir / "report.md", "plot": out_dir / "dice_vs_labels.png",
            "summary": out_dir / "summary.csv", "results": out_dir / "results.csv"}


def _write_tables(out_dir: Path, on: str, rows: list[dict], table: dict, methods: list[str]) -> None:
    """``results.csv`` (one row per run; the columns say which set the scores are from: ``test_dice`` or ``dev_dice``)
    and ``summary.csv`` (mean and sd over seeds per method and budget)."""
    with open(out_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "budget", "seed", f"{on}_dice", f"{on}_iou", f"{on}_hd95", "run_id"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, **{f"{on}_{k}": r[k] for k in ("dice", "iou", "hd95")}} for r in rows)
    with open(out_dir / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "budget", "dice_mean", "dice_std", "n_seeds"])
        for (m, b), (mu, sd, n) in sorted(table.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
            w.writerow([m, b, f"{mu:.4f}", f"{sd:.4f}", n])


def _results_lines(cfg, rows: list[dict], table: dict, methods: list[str], budgets: list[int], parent_run_id: str | None) -> list[str]:
    """The report's title and its table of mean ± sd Dice per method and budget (the best per budget in bold)."""
    lines = [f"# Ablation `{cfg.name}`: {cfg.source.name} → {cfg.target.name}", "",
             (f"Test Dice on `{cfg.target.name}` test split" if cfg.evaluate_on == "test" else
              f"Development Dice on `{cfg.target.name}` pool images outside each seed's largest subset (not the test split)")
             + f" (mean ± std over seeds {cfg.seeds}"
             + "".join(f"; {len(v)} seeds at {b} label{'s' if b != 1 else ''}" for b, v in sorted(cfg.seeds_at.items()))
             + "), "
             f"from {len(rows)} fine-tune runs" + (f" (MLflow parent run `{parent_run_id}`)." if parent_run_id else "."), ""]
    waiting = unsynced(cfg.folder)
    if waiting:
        lines += [f"Not yet in MLflow (the tracking server was unreachable; `medhybrid sync {cfg.folder}` sends them): "
                  + ", ".join(f"`{p.relative_to(cfg.folder) if p != cfg.folder else '.'}`" for p in waiting) + ".", ""]
    lines += ["| method | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            if (m, b) in table:
                mu, sd, n = table[(m, b)]
                best = mu >= max(table[(mm, b)][0] for mm in methods if (mm, b) in table) - 1e-12
                cell = f"{mu:.3f} ± {sd:.3f}"
                cells.append(f"**{cell}**" if best else cell)
            else:
                cells.append("–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _verdict_lines(cfg, tests: list[dict], best_other: str | None, score: str) -> list[str]:
    """The verdict: the reference against the best other method, budgets ≤ POOLED_MAX_BUDGET pooled."""
    small = [t for t in tests if t["baseline"] == best_other and isinstance(t["budget"], int) and t["budget"] <= POOLED_MAX_BUDGET]
    row = next((t for t in tests if t["baseline"] == best_other and t["budget"] == f"≤ {POOLED_MAX_BUDGET}"),
               small[0] if len(small) == 1 else None)  # a single small budget is its own pool
    if row is None:
        return []
    v = verdict(row["result"], adjusted_p=row["p_holm"])
    return ["", f"**Verdict at ≤ {POOLED_MAX_BUDGET} labels: `{cfg.reference}` {v} the best other method, "
            f"`{best_other}`**: {row['mean_diff']:+.3f} {score}, 95 % CI [{row['ci_low']:+.3f}, "
            f"{row['ci_high']:+.3f}], p = {_p(row['p_holm'])} (paired t-test over labelled subsets, Holm), "
            f"{row['seeds']} seeds, {row['images']} paired image scores. A verdict other than a tie "
            "needs both the interval to exclude 0 and the corrected test to reject."]


GENERATIVE = ("diffusion", "mdm")
"""Pretrainings with no mask objective: whether they beat a random start says whether the generative pretext task
learned anything that transfers."""


def _pretext_lines(cfg, rows: list[dict], scores: dict, out_dir: Path, score: str) -> list[str]:
    """Did the generative pretext task learn anything transferable? Each generative-only method (``diffusion``,
    ``mdm``) that the ablation ran against ``scratch``, paired, at ≤ POOLED_MAX_BUDGET labels. When none beats scratch
    (its interval above 0), the hybrid's claim (its generative half adds to supervised pretraining) cannot be tested at
    this scale, and the line says so. Samples of the diffusion pretraining (``medhybrid sample``) show what it learned."""
    ran = {r["method"] for r in rows}
    generative = [m for m in cfg.methods if m in ran and cfg.methods[m].pretrain in GENERATIVE and cfg.methods[m].head != "ddpm-features"]
    if "scratch" not in ran or not generative:
        return []
    learned, parts = False, []
    for m in generative:
        vs = [t for t in paired_comparisons(rows, scores, m) if t["baseline"] == "scratch"]
        small = [t for t in vs if isinstance(t["budget"], int) and t["budget"] <= POOLED_MAX_BUDGET]
        row = next((t for t in vs if t["budget"] == f"≤ {POOLED_MAX_BUDGET}"), small[0] if len(small) == 1 else None)
        if row is None:  # (a single small budget is its own pool)
            continue
        learned |= row["ci_low"] > 0
        parts.append(f"`{m}` − `scratch` {row['mean_diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], "
                     f"p = {_p(row['p_value'])}")
    if not parts:
        return []
    answer = ("yes: generative pretraining beats a random start, so the hybrid's comparison with supervised pretraining "
              "tests its claim" if learned else
              "no: generative pretraining is no better than a random start here, so comparing the hybrid with supervised "
              "pretraining cannot test the hybrid's claim at this scale (its generative half has nothing to add); it "
              "takes a scale where diffusion pretraining beats scratch")
    lines = ["", f"**Did the generative pretext task learn anything transferable? {answer[0].upper() + answer[1:]}.** "
             f"{score} at ≤ {POOLED_MAX_BUDGET} labels, paired: " + "; ".join(parts) + "."]
    grid = _samples(cfg, out_dir)
    if grid is not None:
        lines += ["", f"Samples of the `{cfg.methods[grid[0]].pretrain}` pretraining (`medhybrid sample`, 18 steps):", "",
                  f"![samples]({grid[1].name})"]
    return lines


def _samples(cfg, out_dir: Path) -> tuple[str, Path] | None:
    """A grid of samples from the ablation's diffusion (else hybrid) pretraining, drawn once into the report folder."""
    from medhybrid.workflows.sampling import sample_to_grid

    for mode in ("diffusion", "hybrid"):
        method = next((m for m, s in cfg.methods.items() if s.pretrain == mode and s.target_images == "none"), None)
        ckpt = cfg.folder / "pretrain" / cfg.pretraining_of(method) / "model.pt" if method else None
        if ckpt is not None and ckpt.is_file():
            grid = out_dir / f"samples-{mode}.png"
            if not grid.is_file():
                sample_to_grid(ckpt, grid, num=16, steps=18, seed=0)
            return method, grid
    return None


def _comparison_lines(cfg, tests: list[dict], score: str) -> list[str]:
    """The table of paired differences, reference − each baseline, with how they were computed."""
    if not tests:
        return []
    n_primary = sum(t["budget"] == f"≤ {POOLED_MAX_BUDGET}" for t in tests)
    lines = ["", f"Paired difference `{cfg.reference}` − baseline ({score} on the same images, after fine-tuning on the "
             "same labelled subsets). 95 % CI: hierarchical bootstrap resampling seeds, then images within each seed "
             "(2000 replicates). p: paired t-test on the per-subset mean differences (the labelled subset is the unit), "
             f"Holm-corrected within two families: the {n_primary} '≤ {POOLED_MAX_BUDGET}' rows (the verdict's question, one "
             f"per baseline) and the other {len(tests) - n_primary} rows. '≤ {POOLED_MAX_BUDGET}', '≤ {FEWEST_MAX_BUDGET}' "
             "(where shown) and 'all budgets' pool budgets (one seed draw shared by all budgets; each (budget, seed) one "
             "unit of the test). With few seeds the bootstrap sees few distinct subsets and its interval understates their "
             "spread; the test does not.", "",
             "| baseline | budget | seeds | images | mean diff | 95 % CI | p | p (Holm) |", "|---|---|---|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t['baseline']} | {t['budget']} | {t['seeds']} | {t['images']} | {t['mean_diff']:+.3f} | "
                     f"[{t['ci_low']:+.3f}, {t['ci_high']:+.3f}] | {_p(t['p_value'])} | {_p(t['p_holm'])} |")
    return lines


def _timing_lines(cfg) -> list[str]:
    """The ablation's wall time over all its invocations (``timings.json``), when recorded, and its split per method
    and stage (a pretraining shared by several methods is counted under the first that ran it)."""
    timings = Path(cfg.folder) / "timings.json"
    if not timings.is_file():
        return []
    inv = json.loads(timings.read_text())["invocations"]
    total = sum(i.get("wall_s", 0.0) for i in inv)
    devices = sorted({i["device"] for i in inv})
    lines = ["", f"Wall time: {total / 60:.1f} min on {', '.join(devices)} over {len(inv)} invocation(s) "
             "(`timings.json` in the ablation folder). Per method and stage, in minutes:", "",
             "| method | pretraining | fine-tuning | evaluation | total |", "|---|---|---|---|---|"]
    stages = ("pretrain_s", "train_s", "eval_s")
    untimed = []
    for m in cfg.methods:
        t = [sum(i["methods"].get(m, {}).get(s, 0.0) for i in inv) / 60 for s in stages]
        if sum(t) >= 0.05:  # a method whose runs were all skipped as finished spent a few milliseconds
            lines.append(f"| {m} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {sum(t):.1f} |")
        else:
            untimed.append(f"`{m}`")
    if untimed:
        lines += ["", f"Not in this table: {', '.join(untimed)}, whose runs had all finished before the invocations "
                  "that `timings.json` records."]
    return lines


def _plot(path: Path, cfg, table: dict, methods: list[str], budgets: list[int], tests: list[dict], best: str | None,
          score: str) -> None:
    """Left: mean Dice against labels per method. Right: reference − best baseline per budget with its 95 % CI."""
    diff = [t for t in tests if t["baseline"] == best and isinstance(t["budget"], int)]
    fig = Figure(figsize=(11 if diff else 6, 4.2))
    axes = fig.subplots(1, 2 if diff else 1, squeeze=False)
    ax = axes[0, 0]
    cmap = colormaps["tab20"]
    for i, m in enumerate(methods):
        bs = [b for b in budgets if (m, b) in table]
        ref = m == cfg.reference
        ax.plot(bs, [table[(m, b)][0] for b in bs], marker="o", label=m, color=cmap((2 * i) % 20 + (2 * i) // 20 % 2),
                lw=2.5 if ref else 1.2, zorder=3 if ref else 2)
    for a in axes[0]:
        a.set_xscale("log")
        a.xaxis.set_major_locator(FixedLocator(budgets))
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xticklabels([str(b) for b in budgets])
        a.set_xlabel(f"labelled {cfg.target.name} images")
        a.grid(alpha=0.3)
    ax.set_ylabel(f"mean {score} ({cfg.target.name})")
    ax.set_title(f"{cfg.source.name} → {cfg.target.name}")
    ax.legend(fontsize=7, ncol=2)
    if diff:
        ax2 = axes[0, 1]
        x = [t["budget"] for t in diff]
        mu = np.array([t["mean_diff"] for t in diff])
        err = np.array([[t["mean_diff"] - t["ci_low"] for t in diff], [t["ci_high"] - t["mean_diff"] for t in diff]])
        ax2.errorbar(x, mu, yerr=err, marker="o", capsize=4, color="black")
        ax2.axhline(0, color="grey", lw=1)
        ax2.set_ylabel(f"{score} difference")
        ax2.set_title(f"{cfg.reference} − {best}\n(95 % CI, hierarchical bootstrap)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def embed_in_readme(report_md: Path, readme: Path, name: str) -> None:
    """Replace the text between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in ``readme`` with
    the generated report (headings demoted, the plot linked relative to the README); appended if absent."""
    readme, report_md = Path(readme), Path(report_md)
    # the run folder is not versioned: keep a copy of the generated report beside the README
    keep = readme.parent / "docs" / "results" / name
    keep.mkdir(parents=True, exist_ok=True)
    for f in report_md.parent.iterdir():
        shutil.copy2(f, keep / f.name)
    report_md = keep / report_md.name
    body = report_md.read_text().replace("](dice_vs_labels.png)",
                                         f"]({os.path.relpath(report_md.parent / 'dice_vs_labels.png', readme.parent)})")
    body = re.sub(r"^# ", "### ", body, flags=re.M)
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = readme.read_text()
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


def pretraining_iterations(cfg) -> int:
    """Pretraining iterations of an ablation config (its shared ``pretrain.train``, TrainConfig's defaults elsewhere)."""
    return TrainConfig(**(cfg.pretrain.get("train") or {})).iterations


def write_length_curve(cfgs: list, out_dir: Path, baseline: str = "supervised", methods: list[str] | None = None,
                       max_budget: int = POOLED_MAX_BUDGET, n_boot: int = 2000) -> dict[str, Path]:
    """Does the gap grow with pretraining? ``cfgs``: ablations of one domain that differ in pretraining length. Over
    the (budget ≤ ``max_budget``, seed) subsets that every ablation ran for every method, each method's mean score and
    each method − ``baseline`` paired difference (pooled over those budgets, CI and t-test as in
    :func:`paired_comparisons`, Holm over the curve's points), per pretraining length. Writes ``curve.csv``,
    ``curve.md`` and ``curve.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = []
    for cfg in sorted(cfgs, key=pretraining_iterations):
        parent = runs.read_state(cfg.folder).get("mlflow_run_id") if cfg.mlflow.enabled else None
        rows = collect_results(cfg, parent)
        loaded.append((cfg, pretraining_iterations(cfg), rows, per_image_scores(cfg, rows)))
    names = methods or [m for m in loaded[0][0].methods if all(m in c.methods for c, *_ in loaded)]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not among the methods every ablation ran: {names}")
    units = _shared_units(loaded, names, max_budget)
    points = _curve_points(loaded, names, baseline, units, max_budget, n_boot)
    fields = ["ablation", "iterations", "method", "mean_dice", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm",
              "seeds", "images"]
    with open(out_dir / "curve.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(points)
    (out_dir / "curve.md").write_text("\n".join(_curve_lines(loaded, names, baseline, units, points)))
    scored = "test" if loaded[0][0].evaluate_on == "test" else "development"
    _plot_curve(out_dir / "curve.png", points, names, baseline, loaded[0][0].target.name, scored)
    return {"markdown": out_dir / "curve.md", "csv": out_dir / "curve.csv", "plot": out_dir / "curve.png"}


def _shared_units(loaded: list, names: list[str], max_budget: int) -> set[tuple[int, int]]:
    """The (budget ≤ ``max_budget``, seed) subsets every ablation in ``loaded`` ran for every method in ``names``."""
    units = set.intersection(*({(b, s) for (m, b, s) in sc if b <= max_budget} for *_, sc in loaded))
    units = {u for u in units if all((m, *u) in sc for *_, sc in loaded for m in names)}
    if not units:
        raise ValueError(f"the ablations share no (budget ≤ {max_budget}, seed) subset run by every method {names}")
    return units


def _curve_points(loaded: list, names: list[str], baseline: str, units: set, max_budget: int, n_boot: int) -> list[dict]:
    """One point per (pretraining length, method): its mean Dice over ``units`` and, for every method but the
    baseline, its pooled paired difference to the baseline (Holm-corrected over the curve)."""
    budgets = sorted({b for b, _ in units})
    points = []
    for cfg, iters, rows, scores in loaded:
        kept = [r for r in rows if (r["budget"], r["seed"]) in units and r["method"] in names]
        sub = {k: v for k, v in scores.items() if (k[1], k[2]) in units and k[0] in names}
        for m in names:
            mean = float(np.mean([r["dice"] for r in kept if r["method"] == m]))
            point = {"ablation": cfg.name, "iterations": iters, "method": m, "mean_dice": mean}
            if m != baseline:
                t = next(t for t in paired_comparisons([r for r in kept if r["method"] in (m, baseline)], sub, m, n_boot)
                         if t["budget"] == f"≤ {max_budget}" or (len(budgets) == 1 and t["budget"] == budgets[0]))
                point.update({k: t[k] for k in ("mean_diff", "ci_low", "ci_high", "p_value", "seeds", "images")})
            points.append(point)
    diffs = [p for p in points if "mean_diff" in p]
    for p, adj in zip(diffs, holm([p["p_value"] for p in diffs]), strict=True):
        p["p_holm"] = adj
    return points


def _curve_lines(loaded: list, names: list[str], baseline: str, units: set, points: list[dict]) -> list[str]:
    """``curve.md``: how the points were computed, and a table of each method's mean (and difference) per length."""
    target = loaded[0][0].target.name
    lengths = [it for _, it, *_ in loaded]
    budgets, seeds = sorted({b for b, _ in units}), sorted({s for _, s in units})
    n_diffs = sum("mean_diff" in p for p in points)
    scored = "test" if loaded[0][0].evaluate_on == "test" else "development"
    lines = [f"# Pretraining length: {loaded[0][0].source.name} → {target}", "",
             f"Mean {scored} Dice on `{target}` over budgets {budgets} × seeds {seeds} (the subsets every ablation ran for "
             f"every method), and each method − `{baseline}` on the same images and labelled subsets: 95 % CI by "
             "hierarchical bootstrap (seeds, then images), p by paired t-test over the (budget, seed) subsets, "
             f"Holm-corrected over the curve's {n_diffs} differences. Ablations: "
             + ", ".join(f"`{c.name}` ({it} iterations)" for c, it, *_ in loaded) + ".", "",
             "| method | " + " | ".join(f"{it} it." for it in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for m in names:
        cells = []
        for it in lengths:
            p = next(p for p in points if p["iterations"] == it and p["method"] == m)
            cells.append(f"{p['mean_dice']:.3f}" + (f" ({p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}], "
                                                     f"p = {_p(p['p_holm'])})" if "mean_diff" in p else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + ["", "![Dice against pretraining length](curve.png)", ""]


def _plot_curve(path: Path, points: list[dict], names: list[str], baseline: str, target: str, scored: str = "test") -> None:
    lengths = sorted({p["iterations"] for p in points})
    fig = Figure(figsize=(11, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    for m in names:
        ps = sorted((p for p in points if p["method"] == m), key=lambda p: p["iterations"])
        ax.plot([p["iterations"] for p in ps], [p["mean_dice"] for p in ps], marker="o", label=m)
        if m != baseline:
            mu = np.array([p["mean_diff"] for p in ps])
            err = np.array([[p["mean_diff"] - p["ci_low"] for p in ps], [p["ci_high"] - p["mean_diff"] for p in ps]])
            ax2.errorbar([p["iterations"] for p in ps], mu, yerr=err, marker="o", capsize=4, label=f"{m} − {baseline}")
    for a in (ax, ax2):
        a.set_xscale("log")
        a.xaxis.set_major_locator(FixedLocator(lengths))
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xticklabels([str(v) for v in lengths])
        a.set_xlabel("pretraining iterations")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel(f"mean {scored} Dice ({target})")
    ax2.axhline(0, color="grey", lw=1)
    ax2.set_ylabel(f"{scored} Dice difference (95 % CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


__all__ = ["best_baseline", "collect_results", "embed_in_readme", "FEWEST_MAX_BUDGET", "paired_comparisons",
           "per_image_scores", "POOLED_MAX_BUDGET", "pretraining_iterations", "summary_table", "write_length_curve",
           "write_report"]
