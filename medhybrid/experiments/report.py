"""Ablation report: mean ± std test Dice per method and budget, Dice against the number of labels, and the paired
difference reference (hybrid) − each baseline on the same test images and labelled subsets, with a 95 % confidence
interval from a hierarchical bootstrap over seeds and images and Holm-corrected p-values (:mod:`medhybrid.core.stats`),
ending in one verdict: does the reference beat, tie or lose to the best other method at ≤ 10 labels?

The numbers are read back from the MLflow child runs of the ablation's parent run (or, with MLflow
off, from the fine-tune folders' ``state.json``), and the per-image scores from each run's
``eval/per_image.csv`` (its folder, else its MLflow artifact), so the report shows exactly what was recorded.

What takes compute is done once, by :func:`prepare_report`, never while a report is written: the paired statistics
(bootstrap and t-test of every pair the report compares, ``<ablation>/paired-bootstrap.json``, each with a digest of
the scores it was computed from) and the samples of the diffusion (else hybrid) pretraining
(``<ablation>/samples-<mode>.png``). The ablation calls it when its runs are done, ``medhybrid report`` when a folder
lacks them (one an older version wrote); :func:`write_report` reads them and writes nothing but its own files.

Budgets are typed: a comparison row is about a single :class:`Budget` (the labelled images of a run) or a
:class:`Pooled` set of budgets (``≤ 10``, ``≤ 5``, ``all budgets``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from medhybrid.core import runs, tracking
from medhybrid.core.files import atomic_write, write_json
from medhybrid.core.stats import (
    PairedResult,
    holm,
    paired_bootstrap,
    paired_differences,
    pooled_bootstrap,
    seed_t_test,
    verdict,
)
from medhybrid.engines.fit import TrainConfig

log = logging.getLogger("medhybrid")

POOLED_MAX_BUDGET = 10
"""The verdict's scope: budgets up to this many labels, where the choice of pretraining matters most."""

FEWEST_MAX_BUDGET = 5
"""A second pooled row (in the detail family): the fewest labels, where unlabelled images are meant to help most."""

N_BOOT = 2000
"""Bootstrap replicates of every paired comparison in the report."""

BOOTSTRAP_FILE = "paired-bootstrap.json"
"""The ablation's paired statistics, in its folder (:class:`BootstrapStore`)."""


# ------------------------------------------------------------------------------------------------ typed budgets
@dataclass(frozen=True, order=True)
class Budget:
    """A single label budget: the labelled images of a few-shot run, as the run recorded them (``subset.json``, its
    MLflow run's ``budget`` tag); the whole pool is the pool's size."""

    labels: int

    def __str__(self) -> str:
        return str(self.labels)


@dataclass(frozen=True)
class Pooled:
    """Budgets pooled into one comparison: those of at most ``max_labels`` labels (``≤ 10``), or every budget
    (``max_labels`` None: ``all budgets``)."""

    max_labels: int | None = None

    def covers(self, budget: Budget) -> bool:
        return self.max_labels is None or budget.labels <= self.max_labels

    def __str__(self) -> str:
        return "all budgets" if self.max_labels is None else f"≤ {self.max_labels}"


VERDICT_POOL = Pooled(POOLED_MAX_BUDGET)
"""The verdict's row: budgets ≤ :data:`POOLED_MAX_BUDGET` pooled (the first Holm family)."""

FEWEST_POOL = Pooled(FEWEST_MAX_BUDGET)
ALL_BUDGETS = Pooled()


@dataclass(frozen=True)
class Comparison:
    """One row of the paired comparison reference − ``baseline`` at ``budget`` (a single budget or a pool): seeds,
    images, mean paired difference, bootstrap 95 % CI, the paired t-test's p-value over labelled subsets and that
    p-value Holm-adjusted within its family (:func:`holm_families`; NaN until then)."""

    baseline: str
    budget: Budget | Pooled
    seeds: int
    images: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    p_holm: float = math.nan

    @property
    def result(self) -> PairedResult:
        """The comparison as :func:`medhybrid.core.stats.verdict` reads it (its p-value: the t-test's)."""
        return PairedResult(self.mean_diff, self.ci_low, self.ci_high, self.p_value, self.seeds, self.images)

    def to_json(self) -> dict:
        return asdict(self)  # budget: {"labels": 5} or {"max_labels": 10 | null}

    @classmethod
    def from_json(cls, d: dict) -> Comparison:
        b = d["budget"]
        return cls(**{**d, "budget": Budget(**b) if "labels" in b else Pooled(**b)})


# ---------------------------------------------------------------------------------------------- what the runs recorded
def _recorded_key(run: Path) -> tuple[str, Budget, int] | None:
    """``(method, budget, seed)`` as the few-shot run in ``run`` recorded them: ``subset.json`` (its labelled images and
    seed) and ``config.yaml`` (its ``method``, else the ``method`` of the tags its MLflow run was given). None when the
    run did not record them."""
    subset, config = run / "subset.json", run / "config.yaml"
    if not (subset.is_file() and config.is_file()):
        return None
    sub = json.loads(subset.read_text())
    recorded = yaml.safe_load(config.read_text()) or {}
    method = recorded.get("method") or (recorded.get("tags") or {}).get("method")
    return (method, Budget(int(sub["budget"])), int(sub["seed"])) if method else None


def collect_results(cfg, parent_run_id: str | None) -> list[dict]:
    """One row per finished, evaluated fine-tune: method, budget (a :class:`Budget`), seed, its ``dice``, ``iou`` and
    ``hd95`` on the set the ablation scores on (``cfg.scored_on``), run id and folder. Read from the run folders
    (``state.json`` holds every score, whether or not the tracking server got it; ``config.yaml`` and ``subset.json``
    the run's method, budget and seed); from the parent's MLflow runs and their tags when the folders are not here (a
    report rebuilt on another machine)."""
    rows = []
    on = cfg.scored_on
    for st in sorted(Path(cfg.folder / "finetune").glob("*/*/state.json")):
        s = json.loads(st.read_text())
        scored_on, summary = runs.scores(s)
        if scored_on != on:
            continue
        key = _recorded_key(st.parent)
        if key is None:
            log.warning("report: %s is scored but records no subset.json, or no method in its config.yaml: left out",
                        st.parent)
            continue
        method, budget, seed = key
        scores = {k: summary.get(f"{on}_{k}", math.nan) for k in ("dice", "iou", "hd95")}
        rows.append({"method": method, "budget": budget, "seed": seed, **scores,
                     "run_id": s.get("mlflow_run_id", ""), "folder": str(st.parent)})
    if not rows and parent_run_id:
        for r in tracking.child_runs(tracking.client(cfg.mlflow), parent_run_id, [tracking.experiment_id(cfg.mlflow)]):
            m, t = r.data.metrics, r.data.tags
            if f"{on}_dice" not in m:
                continue
            rows.append({"method": t.get("method"), "budget": Budget(int(t["budget"])), "seed": int(t["seed"]),
                         "dice": m[f"{on}_dice"], "iou": m.get(f"{on}_iou", math.nan),
                         "hd95": m.get(f"{on}_hd95", math.nan), "run_id": r.info.run_id,
                         "folder": t.get("medhybrid.folder", "")})
    order = {m: i for i, m in enumerate(cfg.methods)}
    return sorted(rows, key=lambda r: (order.get(r["method"], 99), r["budget"], r["seed"]))


def report_rows(cfg, parent_run_id: str | None) -> list[dict]:
    """:func:`collect_results` of the methods ``cfg`` selects (a profile's selection)."""
    return [r for r in collect_results(cfg, parent_run_id) if r["method"] in cfg.methods]


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
        tuned = sorted((b, mu) for (m, b), (mu, _, _) in table.items() if m == key and b.labels)
        after = f"{tuned[0][1]:.3f} at {tuned[0][0]}" if tuned else "–"
        lines.append(f"| {key} ({', '.join(methods)}) | {dice:.3f} | {after} |")
    return lines


def unsynced(folder: Path) -> list[Path]:
    """Run folders under ``folder`` whose MLflow records still wait in their outbox (``medhybrid sync`` sends them)."""
    return sorted(p.parent for p in Path(folder).rglob(tracking.OUTBOX))


def summary_table(rows: list[dict]) -> dict[tuple[str, Budget], tuple[float, float, int]]:
    groups: dict[tuple[str, Budget], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r["dice"])
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def per_image_scores(cfg, rows: list[dict]) -> dict[tuple[str, Budget, int], dict[str, float]]:
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


# ------------------------------------------------------------------------------------------------ paired statistics
def _baselines(rows: list[dict], reference: str) -> list[str]:
    """The methods of ``rows`` other than ``reference``, in the order they first appear."""
    names = [r["method"] for r in rows]
    return sorted(set(names) - {reference}, key=names.index)


def pair_comparisons(scores: dict, reference: str, baseline: str, n_boot: int = N_BOOT) -> list[Comparison]:
    """reference − baseline on the same images and labelled subsets (``scores`` keyed as by :func:`per_image_scores`):
    per budget, pooled over budgets ≤ :data:`POOLED_MAX_BUDGET`, over budgets ≤ :data:`FEWEST_MAX_BUDGET` (when that
    pools other budgets) and over all budgets. Each: seeds, images, mean paired difference, hierarchical bootstrap
    95 % CI (seeds and images resampled) and the paired t-test over labelled subsets (the per-seed mean differences;
    pooled rows: per (budget, seed)); ``p_holm`` is left NaN (:func:`holm_families`). Reads nothing but the two
    methods' scores, so the result is stored per pair (:class:`BootstrapStore`)."""
    per_budget: dict[Budget, tuple[list[int], list[np.ndarray]]] = {}
    out = []
    for b in sorted({b for (_, b, _) in scores}):
        seeds = sorted(s for (mm, bb, s) in scores if mm == reference and bb == b and (baseline, b, s) in scores)
        diffs = [paired_differences(scores[(reference, b, s)], scores[(baseline, b, s)]) for s in seeds]
        if not diffs or any(len(d) == 0 for d in diffs):
            continue
        per_budget[b] = (seeds, diffs)
        out.append(_comparison(baseline, b, paired_bootstrap(diffs, n_boot), [float(np.mean(d)) for d in diffs]))
    pooled = {p: [b for b in per_budget if p.covers(b)] for p in (VERDICT_POOL, FEWEST_POOL, ALL_BUDGETS)}
    pools = [VERDICT_POOL, ALL_BUDGETS]
    if pooled[FEWEST_POOL] != pooled[VERDICT_POOL]:  # only when it pools other budgets than the verdict's row
        pools.insert(1, FEWEST_POOL)
    for pool in pools:
        bs = pooled[pool]
        common = sorted(set.intersection(*(set(per_budget[b][0]) for b in bs))) if len(bs) > 1 else []
        if not common:
            continue
        groups = [[per_budget[b][1][per_budget[b][0].index(s)] for s in common] for b in bs]
        units = [float(np.mean(d)) for g in groups for d in g]
        out.append(_comparison(baseline, pool, pooled_bootstrap(groups, n_boot), units))
    return out


def _comparison(baseline: str, budget: Budget | Pooled, res: PairedResult, units: list[float]) -> Comparison:
    """A table row: the bootstrap's mean and interval, and the paired t-test over ``units`` (per-subset mean diffs)."""
    return Comparison(baseline, budget, res.seeds, res.images, res.mean, res.low, res.high, seed_t_test(units))


def holm_families(comparisons: list[Comparison]) -> list[Comparison]:
    """``comparisons`` with ``p_holm``: p-values Holm-adjusted within two families, the verdict's pooled ``≤ 10`` rows
    (one per baseline: the question the report answers) and every other row (the detail)."""
    out = list(comparisons)
    for primary in (True, False):
        family = [i for i, c in enumerate(out) if (c.budget == VERDICT_POOL) == primary]
        for i, adj in zip(family, holm([out[i].p_value for i in family]), strict=True):
            out[i] = replace(out[i], p_holm=adj)
    return out


def paired_comparisons(rows: list[dict], scores: dict, reference: str, n_boot: int = N_BOOT) -> list[Comparison]:
    """reference − each other method of ``rows`` (:func:`pair_comparisons`), Holm-adjusted (:func:`holm_families`).
    Computes the bootstrap: a report reads the stored ones instead (:func:`prepare_report`)."""
    return holm_families([c for m in _baselines(rows, reference) for c in pair_comparisons(scores, reference, m, n_boot)])


def verdict_row(comparisons: list[Comparison], baseline: str, pool: Pooled = VERDICT_POOL) -> Comparison | None:
    """The row a verdict on ``baseline`` over ``pool`` reads: the pooled row, else the one single budget the pool covers
    (a single small budget is its own pool); None when there is neither."""
    mine = [c for c in comparisons if c.baseline == baseline]
    single = [c for c in mine if isinstance(c.budget, Budget) and pool.covers(c.budget)]
    return next((c for c in mine if c.budget == pool), single[0] if len(single) == 1 else None)


def _pair_inputs(scores: dict, reference: str, baseline: str, n_boot: int) -> str:
    """A digest of what :func:`pair_comparisons` of the pair computes from: both methods' per-image scores, n_boot."""
    keys = sorted((m, b.labels, s) for (m, b, s) in scores if m in (reference, baseline))
    payload = {"reference": reference, "baseline": baseline, "n_boot": n_boot,
               "scores": [[m, b, s, sorted(scores[(m, Budget(b), s)].items())] for m, b, s in keys]}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


class BootstrapStore:
    """The ablation's paired statistics, ``<ablation>/paired-bootstrap.json``: per (reference, baseline) pair its rows
    (:func:`pair_comparisons`) and a digest of the scores they were computed from. A pair whose scores have changed
    since (a resumed ablation added runs) reads as missing."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / BOOTSTRAP_FILE
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.pairs = {(e["reference"], e["baseline"]): e for e in data.get("pairs", [])}

    def get(self, reference: str, baseline: str, scores: dict, n_boot: int = N_BOOT) -> list[Comparison] | None:
        """The stored rows of the pair, if they were computed from ``scores``; else None."""
        e = self.pairs.get((reference, baseline))
        if e is None or e["inputs"] != _pair_inputs(scores, reference, baseline, n_boot):
            return None
        return [Comparison.from_json(c) for c in e["comparisons"]]

    def compute(self, pairs: list[tuple[str, str]], scores: dict, n_boot: int = N_BOOT) -> None:
        """Bootstrap ``pairs`` on ``scores`` and write the file (with every pair stored before)."""
        for reference, baseline in pairs:
            self.pairs[(reference, baseline)] = {
                "reference": reference, "baseline": baseline, "inputs": _pair_inputs(scores, reference, baseline, n_boot),
                "comparisons": [c.to_json() for c in pair_comparisons(scores, reference, baseline, n_boot)]}
        write_json(self.path, {"pairs": list(self.pairs.values())}, indent=1)


GENERATIVE = ("diffusion", "mdm")
"""Pretrainings with no mask objective: whether they beat a random start says whether the generative pretext task
learned anything that transfers."""


def _generative(cfg, rows: list[dict]) -> list[str]:
    """The generative-only methods (``diffusion``, ``mdm``, not their pixel-feature heads) that ran beside ``scratch``:
    the pretext line compares each with it. [] when scratch did not run."""
    ran = {r["method"] for r in rows}
    if "scratch" not in ran:
        return []
    return [m for m in cfg.methods if m in ran and m != "scratch" and cfg.methods[m].pretrain in GENERATIVE
            and cfg.methods[m].head != "ddpm-features"]


def _report_pairs(cfg, rows: list[dict]) -> list[tuple[str, str]]:
    """Every (reference, baseline) pair the report of ``rows`` shows: ``cfg.reference`` against each other method that
    ran (when it ran), and each generative-only method against ``scratch``."""
    ran = {r["method"] for r in rows}
    pairs = [(cfg.reference, m) for m in _baselines(rows, cfg.reference)] if cfg.reference in ran else []
    return pairs + [(m, "scratch") for m in _generative(cfg, rows) if (m, "scratch") not in pairs]


def _stored_comparisons(cfg, rows: list[dict], scores: dict) -> dict[tuple[str, str], list[Comparison]]:
    """The stored rows of every pair the report shows; :class:`ReportInputsMissing` names the ones not stored."""
    store = BootstrapStore(cfg.folder)
    found = {p: store.get(*p, scores) for p in _report_pairs(cfg, rows)}
    missing = [f"{r} − {b}" for (r, b), c in found.items() if c is None]
    if missing:
        raise ReportInputsMissing(f"{store.path} has no paired statistics of {', '.join(missing)} for these runs "
                                  f"(missing, or computed from other scores): {_PREPARE}")
    return found


# ------------------------------------------------------------------------------------------------ samples
def _samples_source(cfg) -> tuple[str, Path, Path] | None:
    """The samples the pretext line shows: of the ablation's diffusion (else hybrid) pretraining on the source alone,
    ``(its method, its checkpoint, <ablation>/samples-<mode>.png)``, the first whose grid or checkpoint is there."""
    for mode in ("diffusion", "hybrid"):
        method = next((m for m, s in cfg.methods.items() if s.pretrain == mode and s.target_images == "none"), None)
        if method is None:
            continue
        ckpt = cfg.folder / "pretrain" / cfg.pretraining_of(method) / "model.pt"
        grid = cfg.folder / f"samples-{mode}.png"
        if grid.is_file() or ckpt.is_file():
            return method, ckpt, grid
    return None


def draw_samples(cfg, rows: list[dict]) -> Path | None:
    """The samples grid the report shows beside its pretext line (:func:`_generative`), drawn once
    (``medhybrid sample``: 16 samples, 18 steps, seed 0) into ``<ablation>/samples-<mode>.png``; one an older version
    drew into the ablation's report folder is taken over instead. None when the report shows none."""
    src = _samples_source(cfg) if _generative(cfg, rows) else None
    if src is None:
        return None
    method, ckpt, grid = src
    if grid.is_file():
        return grid
    older = cfg.folder / "report" / grid.name
    if older.is_file():
        log.info("ablation %s: samples of the %s pretraining taken from %s into %s", cfg.name, method, older, grid)
        shutil.copy2(older, grid)
        return grid
    from medhybrid.workflows.sampling import sample_to_grid

    log.info("ablation %s: drawing samples of the %s pretraining (%s) into %s", cfg.name, method, ckpt, grid)
    with atomic_write(grid) as tmp:
        sample_to_grid(ckpt, tmp, num=16, steps=18, seed=0)
    return grid


# ------------------------------------------------------------------------------------------------ the report
class ReportInputsMissing(FileNotFoundError):
    """The ablation folder lacks what :func:`prepare_report` computes (an ablation written by an older version, or
    runs added since): ``medhybrid report`` computes it."""


_PREPARE = "medhybrid report (medhybrid.experiments.report.prepare_report) computes them once"


def prepare_report(cfg, parent_run_id: str | None = None, n_boot: int = N_BOOT) -> dict[str, Path | None]:
    """Compute, once, what :func:`write_report` reads and does not compute: the paired statistics of every pair the
    report shows (:class:`BootstrapStore`; pairs already stored from the same scores are skipped) and its samples grid
    (:func:`draw_samples`; skipped when there). The ablation calls it when its runs are done, ``medhybrid report``
    before writing a report from a folder that lacks them; each computation is logged. Returns their paths."""
    rows = report_rows(cfg, parent_run_id)
    scores = per_image_scores(cfg, rows)
    store = BootstrapStore(cfg.folder)
    todo = [p for p in _report_pairs(cfg, rows) if store.get(*p, scores, n_boot) is None]
    if todo:
        log.info("ablation %s: paired statistics (hierarchical bootstrap, %d replicates; t-test) of %s into %s", cfg.name,
                 n_boot, ", ".join(f"{r} − {b}" for r, b in todo), store.path)
        store.compute(todo, scores, n_boot)
    return {"bootstrap": store.path if store.path.is_file() else None, "samples": draw_samples(cfg, rows)}


def write_report(cfg, out_dir: Path, parent_run_id: str | None = None) -> dict[str, Path]:
    """Write ``results.csv``, ``summary.csv``, ``report.md`` and ``dice_vs_labels.png`` (and a copy of the samples
    grid it shows) under ``out_dir``, from the runs and what :func:`prepare_report` stored; nothing else is written or
    computed. :class:`ReportInputsMissing` (before anything is written) when that is missing or stale."""
    out_dir = Path(out_dir)
    rows = report_rows(cfg, parent_run_id)
    scores = per_image_scores(cfg, rows)
    stored = _stored_comparisons(cfg, rows, scores)
    samples = _samples_source(cfg) if _generative(cfg, rows) else None
    if samples is not None and not samples[2].is_file():
        raise ReportInputsMissing(f"{samples[2]}: the samples of the {samples[0]} pretraining are not drawn: {_PREPARE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary_table(rows)
    methods = [m for m in cfg.methods if any(k[0] == m for k in table)]
    budgets = sorted({k[1] for k in table})
    _write_tables(out_dir, cfg.scored_on, rows, table, methods)

    has_ref = any(r["method"] == cfg.reference for r in rows)
    tests = holm_families([c for m in _baselines(rows, cfg.reference) for c in stored[(cfg.reference, m)]]) if has_ref else []
    best_other = best_baseline(table, cfg.reference) if has_ref else None
    score = "test Dice" if cfg.evaluate_on == "test" else "development Dice"
    _plot(out_dir / "dice_vs_labels.png", cfg, table, methods, budgets, tests, best_other, score)
    lines = (_results_lines(cfg, rows, table, methods, budgets, parent_run_id) + _nnunet_lines(cfg, rows)
             + _zero_shot_lines(cfg, table)
             + _verdict_lines(cfg, tests, best_other, score) + _pretext_lines(cfg, rows, stored, samples, out_dir, score)
             + _comparison_lines(cfg, tests, score) + _timing_lines(cfg) + ["", "![Dice against labels](dice_vs_labels.png)", ""])
    (out_dir / "report.md").write_text("\n".join(lines))
    return {"markdown": out_dir / "report.md", "plot": out_dir / "dice_vs_labels.png",
            "summary": out_dir / "summary.csv", "results": out_dir / "results.csv"}


def _p(p: float) -> str:
    return "–" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3g}"


def best_baseline(table: dict, reference: str, pool: Pooled = VERDICT_POOL) -> str | None:
    """The other method with the highest mean Dice over the budgets of ``pool`` that the reference also ran."""
    budgets = sorted({b for (m, b) in table if m == reference and pool.covers(b)})
    means = {m: np.mean([table[(m, b)][0] for b in budgets]) for m in {m for (m, _) in table} - {reference}
             if budgets and all((m, b) in table for b in budgets)}
    return max(means, key=means.get) if means else None


def _write_tables(out_dir: Path, on: str, rows: list[dict], table: dict, methods: list[str]) -> None:
    """``results.csv`` (one row per run; the columns say which set the scores are from: ``test_dice`` or ``dev_dice``)
    and ``summary.csv`` (mean and sd over seeds per method and budget)."""
    with open(out_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "budget", "seed", f"{on}_dice", f"{on}_iou", f"{on}_hd95", "run_id"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "budget": str(r["budget"]), **{f"{on}_{k}": r[k] for k in ("dice", "iou", "hd95")}} for r in rows)
    with open(out_dir / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "budget", "dice_mean", "dice_std", "n_seeds"])
        for (m, b), (mu, sd, n) in sorted(table.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
            w.writerow([m, str(b), f"{mu:.4f}", f"{sd:.4f}", n])


def _results_lines(cfg, rows: list[dict], table: dict, methods: list[str], budgets: list[Budget],
                   parent_run_id: str | None) -> list[str]:
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


def _verdict_lines(cfg, tests: list[Comparison], best_other: str | None, score: str) -> list[str]:
    """The verdict: the reference against the best other method, budgets ≤ POOLED_MAX_BUDGET pooled."""
    row = verdict_row(tests, best_other)
    if row is None:
        return []
    v = verdict(row.result, adjusted_p=row.p_holm)
    return ["", f"**Verdict at ≤ {POOLED_MAX_BUDGET} labels: `{cfg.reference}` {v} the best other method, "
            f"`{best_other}`**: {row.mean_diff:+.3f} {score}, 95 % CI [{row.ci_low:+.3f}, "
            f"{row.ci_high:+.3f}], p = {_p(row.p_holm)} (paired t-test over labelled subsets, Holm), "
            f"{row.seeds} seeds, {row.images} paired image scores. A verdict other than a tie "
            "needs both the interval to exclude 0 and the corrected test to reject."]


def _pretext_lines(cfg, rows: list[dict], stored: dict, samples: tuple[str, Path, Path] | None, out_dir: Path,
                   score: str) -> list[str]:
    """Did the generative pretext task learn anything transferable? Each generative-only method (``diffusion``,
    ``mdm``) that the ablation ran against ``scratch``, paired, at ≤ POOLED_MAX_BUDGET labels. When none beats scratch
    (its interval above 0), the hybrid's claim (its generative half adds to supervised pretraining) cannot be tested at
    this scale, and the line says so. Samples of the diffusion pretraining (``medhybrid sample``, drawn by
    :func:`draw_samples`; copied beside the report) show what it learned."""
    learned, parts = False, []
    for m in _generative(cfg, rows):
        row = verdict_row(stored[(m, "scratch")], "scratch")
        if row is None:
            continue
        learned |= row.ci_low > 0
        parts.append(f"`{m}` − `scratch` {row.mean_diff:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}], "
                     f"p = {_p(row.p_value)}")
    if not parts:
        return []
    answer = ("yes: generative pretraining beats a random start, so the hybrid's comparison with supervised pretraining "
              "tests its claim" if learned else
              "no: generative pretraining is no better than a random start here, so comparing the hybrid with supervised "
              "pretraining cannot test the hybrid's claim at this scale (its generative half has nothing to add); it "
              "takes a scale where diffusion pretraining beats scratch")
    lines = ["", f"**Did the generative pretext task learn anything transferable? {answer[0].upper() + answer[1:]}.** "
             f"{score} at ≤ {POOLED_MAX_BUDGET} labels, paired: " + "; ".join(parts) + "."]
    if samples is not None:
        method, _, grid = samples
        if (out_dir / grid.name).resolve() != grid.resolve():
            shutil.copy2(grid, out_dir / grid.name)
        lines += ["", f"Samples of the `{cfg.methods[method].pretrain}` pretraining (`medhybrid sample`, 18 steps):", "",
                  f"![samples]({grid.name})"]
    return lines


def _comparison_lines(cfg, tests: list[Comparison], score: str) -> list[str]:
    """The table of paired differences, reference − each baseline, with how they were computed."""
    if not tests:
        return []
    n_primary = sum(t.budget == VERDICT_POOL for t in tests)
    lines = ["", f"Paired difference `{cfg.reference}` − baseline ({score} on the same images, after fine-tuning on the "
             "same labelled subsets). 95 % CI: hierarchical bootstrap resampling seeds, then images within each seed "
             f"({N_BOOT} replicates). p: paired t-test on the per-subset mean differences (the labelled subset is the unit), "
             f"Holm-corrected within two families: the {n_primary} '{VERDICT_POOL}' rows (the verdict's question, one "
             f"per baseline) and the other {len(tests) - n_primary} rows. '{VERDICT_POOL}', '{FEWEST_POOL}' "
             f"(where shown) and '{ALL_BUDGETS}' pool budgets (one seed draw shared by all budgets; each (budget, seed) one "
             "unit of the test). With few seeds the bootstrap sees few distinct subsets and its interval understates their "
             "spread; the test does not.", "",
             "| baseline | budget | seeds | images | mean diff | 95 % CI | p | p (Holm) |", "|---|---|---|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t.baseline} | {t.budget} | {t.seeds} | {t.images} | {t.mean_diff:+.3f} | "
                     f"[{t.ci_low:+.3f}, {t.ci_high:+.3f}] | {_p(t.p_value)} | {_p(t.p_holm)} |")
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


def _plot(path: Path, cfg, table: dict, methods: list[str], budgets: list[Budget], tests: list[Comparison],
          best: str | None, score: str) -> None:
    """Left: mean Dice against labels per method. Right: reference − best baseline per budget with its 95 % CI."""
    diff = [t for t in tests if t.baseline == best and isinstance(t.budget, Budget)]
    fig = Figure(figsize=(11 if diff else 6, 4.2))
    axes = fig.subplots(1, 2 if diff else 1, squeeze=False)
    ax = axes[0, 0]
    cmap = colormaps["tab20"]
    for i, m in enumerate(methods):
        bs = [b for b in budgets if (m, b) in table]
        ref = m == cfg.reference
        ax.plot([b.labels for b in bs], [table[(m, b)][0] for b in bs], marker="o", label=m, color=cmap((2 * i) % 20 + (2 * i) // 20 % 2),
                lw=2.5 if ref else 1.2, zorder=3 if ref else 2)
    for a in axes[0]:
        a.set_xscale("log")
        a.xaxis.set_major_locator(FixedLocator([b.labels for b in budgets]))
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xticklabels([str(b) for b in budgets])
        a.set_xlabel(f"labelled {cfg.target.name} images")
        a.grid(alpha=0.3)
    ax.set_ylabel(f"mean {score} ({cfg.target.name})")
    ax.set_title(f"{cfg.source.name} → {cfg.target.name}")
    ax.legend(fontsize=7, ncol=2)
    if diff:
        ax2 = axes[0, 1]
        x = [t.budget.labels for t in diff]
        mu = np.array([t.mean_diff for t in diff])
        err = np.array([[t.mean_diff - t.ci_low for t in diff], [t.ci_high - t.mean_diff for t in diff]])
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


def _shared_units(loaded: list, names: list[str], max_budget: int) -> set[tuple[Budget, int]]:
    """The (budget ≤ ``max_budget``, seed) subsets every ablation in ``loaded`` ran for every method in ``names``."""
    units = set.intersection(*({(b, s) for (m, b, s) in sc if b.labels <= max_budget} for *_, sc in loaded))
    units = {u for u in units if all((m, *u) in sc for *_, sc in loaded for m in names)}
    if not units:
        raise ValueError(f"the ablations share no (budget ≤ {max_budget}, seed) subset run by every method {names}")
    return units


def _curve_points(loaded: list, names: list[str], baseline: str, units: set, max_budget: int, n_boot: int) -> list[dict]:
    """One point per (pretraining length, method): its mean Dice over ``units`` and, for every method but the
    baseline, its pooled paired difference to the baseline (Holm-corrected over the curve)."""
    points = []
    for cfg, iters, rows, scores in loaded:
        kept = [r for r in rows if (r["budget"], r["seed"]) in units and r["method"] in names]
        sub = {k: v for k, v in scores.items() if (k[1], k[2]) in units and k[0] in names}
        for m in names:
            mean = float(np.mean([r["dice"] for r in kept if r["method"] == m]))
            point = {"ablation": cfg.name, "iterations": iters, "method": m, "mean_dice": mean}
            if m != baseline:
                # every kept budget is ≤ max_budget: the row pooling all of them (or the only one)
                t = verdict_row(pair_comparisons(sub, m, baseline, n_boot), baseline, ALL_BUDGETS)
                if t is None:
                    raise ValueError(f"ablation {cfg.name}: {m} and {baseline} share no seed across budgets "
                                     f"{sorted(b.labels for b, _ in units)}: nothing to pool")
                point.update({k: getattr(t, k) for k in ("mean_diff", "ci_low", "ci_high", "p_value", "seeds", "images")})
            points.append(point)
    diffs = [p for p in points if "mean_diff" in p]
    for p, adj in zip(diffs, holm([p["p_value"] for p in diffs]), strict=True):
        p["p_holm"] = adj
    return points


def _curve_lines(loaded: list, names: list[str], baseline: str, units: set, points: list[dict]) -> list[str]:
    """``curve.md``: how the points were computed, and a table of each method's mean (and difference) per length."""
    target = loaded[0][0].target.name
    lengths = [it for _, it, *_ in loaded]
    budgets, seeds = sorted({b.labels for b, _ in units}), sorted({s for _, s in units})
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


__all__ = ["ALL_BUDGETS", "best_baseline", "BOOTSTRAP_FILE", "BootstrapStore", "Budget", "collect_results", "Comparison",
           "draw_samples", "embed_in_readme", "FEWEST_MAX_BUDGET", "FEWEST_POOL", "holm_families", "N_BOOT",
           "pair_comparisons", "paired_comparisons", "per_image_scores", "Pooled", "POOLED_MAX_BUDGET", "prepare_report",
           "pretraining_iterations", "ReportInputsMissing", "report_rows", "summary_table", "VERDICT_POOL", "verdict_row",
           "write_length_curve", "write_report"]
