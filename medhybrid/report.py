"""Ablation report: mean ± std test Dice per method and budget, Dice against the number of labels,
and the paired difference reference (hybrid) − each baseline with a paired t-test across seeds.

The numbers are read back from the MLflow child runs of the ablation's parent run (or, with MLflow
off, from the fine-tune folders' ``state.json``), so the report shows exactly what was recorded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def collect_results(cfg, parent_run_id: str | None) -> list[dict]:
    """One row per finished, evaluated fine-tune: method, budget, seed, test metrics, run id."""
    rows = []
    if parent_run_id:
        from medhybrid import tracking

        c = tracking.client(cfg.mlflow)
        runs = c.search_runs([tracking.experiment_id(cfg.mlflow)], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                             max_results=10000)
        for r in runs:
            m, t = r.data.metrics, r.data.tags
            if "test_dice" not in m:
                continue
            rows.append({"method": t.get("method"), "budget": int(t["budget"]), "seed": int(t["seed"]),
                         "test_dice": m["test_dice"], "test_iou": m.get("test_iou", math.nan),
                         "test_hd95": m.get("test_hd95", math.nan), "run_id": r.info.run_id})
    else:
        for st in sorted(Path(cfg.folder / "finetune").glob("*/*/state.json")):
            s = json.loads(st.read_text())
            if not s.get("evaluated"):
                continue
            method, sd = st.parent.parent.name, st.parent.name.split("-")[1]
            rows.append({"method": method, "budget": len(s.get("ids", [])), "seed": int(sd[1:]), **s["test"], "run_id": ""})
    order = {m: i for i, m in enumerate(cfg.methods)}
    return sorted(rows, key=lambda r: (order.get(r["method"], 99), r["budget"], r["seed"]))


def summary_table(rows: list[dict]) -> dict[tuple[str, int], tuple[float, float, int]]:
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r["test_dice"])
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def paired_tests(rows: list[dict], reference: str) -> list[dict]:
    """reference − baseline per budget (paired by seed) and pooled over all (budget, seed) pairs."""
    from scipy.stats import ttest_rel

    by = {(r["method"], r["budget"], r["seed"]): r["test_dice"] for r in rows}
    methods = sorted({r["method"] for r in rows} - {reference}, key=[r["method"] for r in rows].index)
    budgets = sorted({r["budget"] for r in rows})
    out = []
    for m in methods:
        pooled_a, pooled_b = [], []
        for b in budgets + [None]:
            if b is None:
                a, c = pooled_a, pooled_b
            else:
                seeds = sorted({s for (mm, bb, s) in by if bb == b and mm == reference} & {s for (mm, bb, s) in by if bb == b and mm == m})
                a = [by[(reference, b, s)] for s in seeds]
                c = [by[(m, b, s)] for s in seeds]
                pooled_a += a
                pooled_b += c
            if not a:
                continue
            diff = np.asarray(a) - np.asarray(c)
            p = float(ttest_rel(a, c).pvalue) if len(a) > 1 and np.std(diff) > 0 else math.nan
            out.append({"baseline": m, "budget": "all budgets" if b is None else b, "n": len(a),
                        "mean_diff": float(diff.mean()), "p_value": p})
    return out


def write_report(cfg, out_dir: Path, parent_run_id: str | None = None) -> dict[str, Path]:
    """Write ``results.csv``, ``summary.csv``, ``report.md`` and ``dice_vs_labels.png`` under ``out_dir``."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect_results(cfg, parent_run_id)
    table = summary_table(rows)
    methods = [m for m in cfg.methods if any(k[0] == m for k in table)]
    budgets = sorted({k[1] for k in table})

    with open(out_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "budget", "seed", "test_dice", "test_iou", "test_hd95", "run_id"])
        w.writeheader()
        w.writerows(rows)
    with open(out_dir / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "budget", "dice_mean", "dice_std", "n_seeds"])
        for (m, b), (mu, sd, n) in sorted(table.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
            w.writerow([m, b, f"{mu:.4f}", f"{sd:.4f}", n])

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        bs = [b for b in budgets if (m, b) in table]
        mu = np.array([table[(m, b)][0] for b in bs])
        sd = np.array([table[(m, b)][1] for b in bs])
        ax.plot(bs, mu, marker="o", label=m)
        ax.fill_between(bs, mu - sd, mu + sd, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel(f"labelled {cfg.target.name} images")
    ax.set_ylabel(f"test Dice ({cfg.target.name})")
    ax.set_title(f"{cfg.source.name} → {cfg.target.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "dice_vs_labels.png", dpi=120)
    plt.close(fig)

    lines = [f"# Ablation `{cfg.name}`: {cfg.source.name} → {cfg.target.name}", "",
             (f"Test Dice on `{cfg.target.name}` test split" if cfg.evaluate_on == "test" else
              f"Development Dice on `{cfg.target.name}` pool images outside each seed's largest subset (not the test split)")
             + f" (mean ± std over seeds {cfg.seeds}), "
             f"from {len(rows)} MLflow fine-tune runs" + (f" under parent run `{parent_run_id}`." if parent_run_id else "."), "",
             "| method | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
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
    tests = paired_tests(rows, cfg.reference) if any(r["method"] == cfg.reference for r in rows) else []
    if tests:
        lines += ["", f"Paired difference `{cfg.reference}` − baseline (Dice; paired t-test across seeds; "
                  "'all budgets' pools every (budget, seed) pair):", "",
                  "| baseline | budget | n | mean diff | p |", "|---|---|---|---|---|"]
        for t in tests:
            p = "–" if math.isnan(t["p_value"]) else f"{t['p_value']:.3g}"
            lines.append(f"| {t['baseline']} | {t['budget']} | {t['n']} | {t['mean_diff']:+.3f} | {p} |")
    timings = Path(cfg.folder) / "timings.json"
    if timings.is_file():
        inv = json.loads(timings.read_text())["invocations"]
        total = sum(i.get("wall_s", 0.0) for i in inv)
        devices = sorted({i["device"] for i in inv})
        lines += ["", f"Wall time: {total / 60:.1f} min on {', '.join(devices)} over {len(inv)} invocation(s) "
                  "(`timings.json` in the ablation folder splits it by method and stage)."]
    lines += ["", "![Dice against labels](dice_vs_labels.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return {"markdown": out_dir / "report.md", "plot": out_dir / "dice_vs_labels.png",
            "summary": out_dir / "summary.csv", "results": out_dir / "results.csv"}


def embed_in_readme(report_md: Path, readme: Path, name: str) -> None:
    """Replace the text between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in ``readme`` with
    the generated report (headings demoted, the plot linked relative to the README); appended if absent."""
    import os
    import re
    import shutil

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
