"""The label-budget ablation: methods x budgets x seeds, in one command.

One pretraining per method and domain is reused across budgets and seeds. Each fine-tune is its own
MLflow run (tags: method, budget, seed, domain, pretrain run id) under one parent run. The runner is
resumable (finished fine-tunes are skipped) and a failed run is recorded and does not stop the others.
The report (:mod:`medhybrid.experiments.report`) is built from the MLflow runs themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from medhybrid.core import runs, tracking
from medhybrid.core.config import (
    ConfigError,
    StrictModel,
    apply_overrides,
    deep_merge,
    dump_config,
    find_config,
    read_yaml,
    save_config,
    validate,
)
from medhybrid.core.files import disk_full, write_json
from medhybrid.core.tracking import MLflowConfig
from medhybrid.data.datasets import few_shot_ids, load_pairs
from medhybrid.data.specs import DatasetRef, Preprocess
from medhybrid.experiments.heads import RunKey, finetune_config, get_head, pixel_features_config
from medhybrid.experiments.report import prepare_report, write_report
from medhybrid.networks.checkpoints import load_model
from medhybrid.networks.modes import get_mode
from medhybrid.workflows.evaluate import evaluate
from medhybrid.workflows.pretrain import PretrainConfig, run_pretraining

log = logging.getLogger("medhybrid")

DEFAULT_METHODS = {
    "scratch": {"pretrain": "none"},
    "supervised": {"pretrain": "supervised"},
    "diffusion": {"pretrain": "diffusion"},
    "hybrid": {"pretrain": "hybrid"},
    "mdm": {"pretrain": "mdm"},
    "ddpm-features": {"pretrain": "diffusion", "head": "ddpm-features"},
}


class MethodSpec(StrictModel):
    pretrain: str = Field(description="pretraining mode: none, supervised, diffusion, hybrid, mdm")
    overrides: dict[str, Any] = Field(default_factory=dict, description="pretrain config overrides for this method")
    target_images: Literal["none", "add", "only"] = Field(
        "none", description="the target's pool images, without their masks, in pretraining (never its test images): "
        "add = beside the labelled source at unlabelled.share of each batch; only = the pool alone (diffusion, mdm: "
        "self-pretraining on the target, as in Pan et al. 2023)")
    head: str = Field("finetune", description="what trains on the labelled subset, a registered head "
                      "(medhybrid.experiments.heads): finetune, the whole network on the few labels; ddpm-features, frozen "
                      "decoder features + MLP ensemble; nnunet, nnU-Net v2 trained on the few labels (its own network and "
                      "schedule; pretrain must be none)")
    finetune: dict[str, Any] = Field(default_factory=dict, description="fine-tuning config overrides for this method "
                                     "(semi: {algorithm: fixmatch} fine-tunes semi-supervised on the pool's other images)")
    adapt: dict[str, Any] = Field(default_factory=dict, description="head adapt only: its menu and decision rule for "
                                  "this method, AdaptConfig fields (rule, recipes, wise, max_loo, folds), e.g. "
                                  "{rule: {min_gain: 0.05}}; a variant is a method of its own name")

    @model_validator(mode="after")
    def _head_suits_pretraining(self):
        head = get_head(self.head)
        head.check(self)
        if self.adapt and not head.settings:
            raise ValueError(f"adapt settings are for head adapt, not head {self.head!r}")
        if unknown := sorted(set(self.adapt) - set(head.settings)):
            raise ValueError(f"adapt settings {unknown} cannot be set per method; these can: {list(head.settings)}")
        return self

    @property
    def semi_supervised(self) -> bool:
        """Whether the method's fine-tuning reads the pool's unlabelled images."""
        return (self.finetune.get("semi") or {}).get("algorithm", "none") != "none"


class TaskResources(StrictModel):
    """What one Ray task declares (Ray schedules as many at once as the cluster's resources allow)."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0, description="a fraction shares one GPU: 0.25 runs four fine-tunes on it at once")


class RayConfig(StrictModel):
    """``executor: ray``: pretrainings and fine-tunes as Ray tasks. Workers must reach ``mlflow.tracking_uri``: on a
    cluster that is a tracking server (``http://host:5000``), and the run folder (``output_dir``) and the data a
    shared filesystem; on one machine the local SQLite store serves."""

    address: str | None = Field(None, description="None: start a local Ray instance; 'auto' or 'ray://head:10001': "
                                "join a running cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance (None: all)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local instance (None: all)")
    object_store_mb: int | None = Field(None, ge=64, description="object store of a local instance (None: Ray's "
                                        "default, 30 % of memory); tasks pass configs and results only, not tensors")
    pretrain: TaskResources = Field(default_factory=TaskResources)
    finetune: TaskResources = Field(default_factory=TaskResources)


class AblationConfig(StrictModel):
    name: str
    source: DatasetRef
    target: DatasetRef
    methods: dict[str, MethodSpec] = Field(default_factory=lambda: {k: MethodSpec(**v) for k, v in DEFAULT_METHODS.items()})
    budgets: list[int | None] = Field(default_factory=lambda: [1, 2, 5, 10, 20, 50, None],
                                      description="labelled images; null = the whole pool")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    seeds_at: dict[int, list[int]] = Field(default_factory=dict, description="budget -> its own seeds (labelled subsets), "
                                           "e.g. more at 1 and 2 labels, where the subset drawn moves Dice most and a "
                                           "fine-tune costs least; other budgets use seeds")
    output_dir: Path | None = None
    pretrain: dict[str, Any] = Field(default_factory=dict, description="shared PretrainConfig fields")
    finetune: dict[str, Any] = Field(default_factory=dict, description="shared FinetuneConfig fields")
    pixel_features: dict[str, Any] = Field(default_factory=dict, description="shared PixelFeaturesConfig fields "
                                           "(features, ensemble) of ddpm-features methods")
    nnunet: dict[str, Any] = Field(default_factory=dict, description="shared NnunetConfig fields (trainer, configuration, "
                                   "device) of nnunet methods; resolution defaults to the pretraining's")
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    reference: str = Field("hybrid", description="method compared against each baseline in the report")
    executor: Literal["sequential", "ray"] = Field("sequential", description="sequential: every run in this process, "
                                                   "one after another; ray: Ray tasks (see ray)")
    ray: RayConfig = Field(default_factory=RayConfig)
    evaluate_on: Literal["test", "pool-holdout"] = Field(
        "test", description="test: the target's test split (the reported results). pool-holdout: the pool images outside "
        "each seed's largest subset, a development set for choosing settings without ever touching test")
    dev_unlabelled: float = Field(0.5, ge=0, lt=1, description="pool-holdout: the share of the held-out pool images set "
                                  "aside as unlabelled images for semi-supervised methods (never scored); the rest is "
                                  "the development set, the same for every method")

    @model_validator(mode="after")
    def _holdout_needs_finite_budgets(self):
        if self.evaluate_on == "pool-holdout" and None in self.budgets:
            raise ValueError("evaluate_on=pool-holdout needs finite budgets: the whole pool leaves nothing held out")
        return self

    def seeds_for(self, budget: int | None) -> list[int]:
        """The seeds (labelled subsets) drawn at ``budget``."""
        return self.seeds_at.get(budget, self.seeds) if budget is not None else self.seeds

    @property
    def scored_on(self) -> str:
        """The name of the set every fine-tune is scored on, the prefix of its metrics: ``test`` or ``dev``."""
        return "test" if self.evaluate_on == "test" else "dev"

    def eval_pairs(self, seed: int) -> list[dict] | None:
        """The pairs each fine-tune of ``seed`` is scored on (None: the target's test split). On ``pool-holdout``: the
        pool images outside the seed's largest subset, less the ``dev_unlabelled`` share of them (drawn with the seed)
        that semi-supervised methods may read without masks, so that no method ever trains on an image it is scored on."""
        if self.evaluate_on == "test":
            return None

        pool = load_pairs(self.target, "pool")
        used = set(few_shot_ids([p["id"] for p in pool], max(self.budgets), seed))
        held = [p for p in pool if p["id"] not in used]
        if self.dev_unlabelled and len(held) > 1:
            aside = set(few_shot_ids([p["id"] for p in held], int(round(self.dev_unlabelled * len(held))) or 1, seed + 7919))
            held = [p for p in held if p["id"] not in aside]
        return held

    @property
    def folder(self) -> Path:
        return Path(self.output_dir or Path("runs") / "ablation" / self.name)

    def pretraining_of(self, method: str) -> str:
        """The method whose pretraining ``method`` reuses: the first one with the same mode and overrides
        (``ddpm-features`` shares the ``diffusion`` network rather than training its own copy)."""
        spec = self.methods[method]
        same = (spec.pretrain, spec.overrides, spec.target_images)
        return next(m for m, s in self.methods.items() if (s.pretrain, s.overrides, s.target_images) == same)

    @property
    def resolution(self) -> int:
        """The pretrainings' input size (``pretrain.preprocess.resolution``, else its default)."""
        return int((self.pretrain.get("preprocess") or {}).get("resolution") or Preprocess().resolution)


def pretraining_of(cfg: AblationConfig, method: str) -> str:
    """:meth:`AblationConfig.pretraining_of`."""
    return cfg.pretraining_of(method)


def pretrain_config(cfg: AblationConfig, method: str):
    key = pretraining_of(cfg, method)
    spec = cfg.methods[key]
    data = deep_merge(cfg.pretrain, spec.overrides)
    data.update(mode=spec.pretrain, dataset=cfg.source.model_dump(), output_dir=str(cfg.folder / "pretrain" / key),
                mlflow=deep_merge(dump_config(cfg.mlflow), {"run_name": f"{cfg.name}-pretrain-{key}"}))
    if spec.target_images != "none":  # the pool's images only: the target's test split never enters pretraining
        pool = {"dataset": cfg.target.model_dump(), "splits": ["pool"]}
        data["unlabelled"] = deep_merge(data.get("unlabelled") or {}, {"sources": [pool]})
        if spec.target_images == "only":
            data["dataset"] = None
    return validate(PretrainConfig, data, source=f"ablation {cfg.name} pretrain {key}")


class _Timings:
    """Wall-clock seconds per method and stage of this invocation, appended to ``<folder>/timings.json``
    (one entry per invocation, so a resumed ablation's total is the sum). The entry is written after every stage
    (``finished: false`` until :meth:`save`), so an invocation that is killed keeps the time it spent."""

    def __init__(self, folder: Path):
        self.path = folder / "timings.json"
        self.history = json.loads(self.path.read_text())["invocations"] if self.path.is_file() else []
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        self.entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device, "host": platform.node(),
                      "torch_threads": torch.get_num_threads(), "methods": {}}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, method: str, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(method, **{stage: time.perf_counter() - t})

    def add(self, method: str, **stages: float) -> None:
        """Add each of ``stages`` (seconds: ``train_s=..., eval_s=...``) to ``method``, then write once."""
        m = self.entry["methods"].setdefault(method, {})
        for k, v in stages.items():
            m[k] = m.get(k, 0.0) + v
        self._write(finished=False)

    def _write(self, finished: bool) -> None:
        self.entry["wall_s"] = time.perf_counter() - self.t0
        self.entry["finished"] = finished
        write_json(self.path, {"invocations": [*self.history, self.entry]}, indent=1)

    def save(self) -> float:
        self._write(finished=True)
        return self.entry["wall_s"]


def pretrain_step(cfg: AblationConfig, method: str):
    """One method's pretraining (or the finished one): :func:`medhybrid.workflows.pretrain.run_pretraining`, then its zero-shot
    score (:func:`zero_shot_step`)."""
    pre = run_pretraining(pretrain_config(cfg, method))
    zero_shot_step(cfg, method, pre)
    return pre


def zero_shot_step(cfg: AblationConfig, method: str, pre) -> dict | None:
    """Budget 0: a pretraining that learned masks (supervised, hybrid; not diffusion, mdm or none) scored on the set
    every fine-tune is scored on, before any fine-tuning, so a report separates what transfers from what fine-tuning
    adds. Once per pretraining: ``<ablation>/zero-shot/<pretraining>/`` (``state.json``, ``eval/per_image.csv``), the
    summary also logged to the pretraining's MLflow run (``zero_shot_test_dice`` ...). None for other pretrainings."""
    spec = cfg.methods[method]
    if not get_mode(spec.pretrain).learns_masks or spec.target_images == "only":
        return None
    folder = cfg.folder / "zero-shot" / pretraining_of(cfg, method)
    st = runs.read_state(folder)
    scored_on, scores = runs.scores(st)
    if scored_on == cfg.scored_on:
        return scores
    net, meta = load_model(pre.checkpoint)
    pairs = cfg.eval_pairs(cfg.seeds[0])
    ev = evaluate(net, cfg.target, Preprocess(**meta["preprocess"]), "test" if pairs is None else "dev",
                  out_dir=folder / "eval", pairs=pairs)
    if pre.run_id:
        tracking.log_metrics(cfg.mlflow, pre.run_id, {f"zero_shot_{k}": v for k, v in ev.summary.items()}, step=0)
    runs.write_state(folder, pretraining=str(pre.checkpoint), evaluated=True, scored_on=ev.split, scores=ev.summary)
    log.info("ablation %s: %s before fine-tuning: %s dice %.4f", cfg.name, pretraining_of(cfg, method), ev.split,
             ev.summary[f"{ev.split}_dice"])
    return ev.summary


def finetune_step(cfg: AblationConfig, method: str, pre, budget: int | None, seed: int, parent: str | None) -> dict:
    """One few-shot run of ``method``'s head (:mod:`medhybrid.experiments.heads`: a fine-tune, a pixel-feature head,
    an nnU-Net run) from the pretraining ``pre``, evaluated and recorded in its MLflow run; a finished and evaluated
    run is skipped. Returns ``{"tag", "skipped", "dice", "train_s", "eval_s"}``, ``dice`` on the set
    :attr:`AblationConfig.scored_on` names."""
    key = RunKey(method, budget, seed)
    head = get_head(cfg.methods[method].head)
    fcfg = head.config(cfg, key, pre, parent)
    st = runs.read_state(fcfg.folder)
    if st.get("status") == "finished" and runs.scores(st)[0] == cfg.scored_on:
        log.info("ablation %s: %s already done, skipped", cfg.name, key.tag)
        return {"tag": key.tag, "skipped": True}
    t0 = time.perf_counter()
    summary, train_s = head.run(cfg, fcfg, seed)
    dice = summary[f"{cfg.scored_on}_dice"]
    log.info("ablation %s: %s %s dice %.4f", cfg.name, key.tag, cfg.scored_on, dice)
    return {"tag": key.tag, "skipped": False, "dice": dice, "train_s": train_s,
            "eval_s": time.perf_counter() - t0 - train_s}


def _record_failure(cfg: AblationConfig, failures: list[str], tag: str, e: BaseException, trace: str) -> None:
    log.error("ablation %s: %s failed: %s", cfg.name, tag, e)
    failures.append(f"{tag}: {type(e).__name__}: {e}")
    with (cfg.folder / "failures.log").open("a") as fh:
        fh.write(f"{tag}\n{trace}\n")


def _run_sequential(cfg: AblationConfig, parent: str | None, clock: _Timings, failures: list[str]) -> None:
    for method in cfg.methods:
        try:
            with clock(method, "pretrain_s"):
                pre = pretrain_step(cfg, method)
        except Exception as e:
            if disk_full(e):  # every later run would fail the same way
                raise
            _record_failure(cfg, failures, f"pretrain {method}", e, traceback.format_exc())
            continue
        for budget in cfg.budgets:
            for seed in cfg.seeds_for(budget):
                try:
                    out = finetune_step(cfg, method, pre, budget, seed, parent)
                except Exception as e:
                    if disk_full(e):
                        raise
                    _record_failure(cfg, failures, RunKey(method, budget, seed).tag, e,
                                    traceback.format_exc())
                    continue
                clock.add(method, train_s=out.get("train_s", 0.0), eval_s=out.get("eval_s", 0.0))


def _in_driver_folder(cwd: str, cfg: AblationConfig) -> None:
    """Run a task in the driver's working folder, where the ablation's relative paths (the run folder, its
    checkpoints) point; on a node without that folder, a relative run folder cannot be found: say what to pass."""
    if os.getcwd() == cwd:
        return
    if os.path.isdir(cwd):
        os.chdir(cwd)
    elif not cfg.folder.is_absolute():
        raise RuntimeError(f"this Ray worker has no folder {cwd}, the driver's working folder, where the run folder "
                           f"{cfg.folder} is: give the ablation an absolute output_dir on a filesystem every node sees")


def _timed_pretrain(cwd: str, cfg: AblationConfig, method: str):
    _in_driver_folder(cwd, cfg)
    t = time.perf_counter()
    return pretrain_step(cfg, method), time.perf_counter() - t


def _finetune_after(cwd: str, cfg: AblationConfig, method: str, timed_pre, budget: int | None, seed: int,
                    parent: str | None) -> dict:
    _in_driver_folder(cwd, cfg)
    return finetune_step(cfg, method, timed_pre[0], budget, seed, parent)


def _pinned_for_workers(cfg: AblationConfig) -> AblationConfig:
    """``cfg`` with the MLflow tracking URI made absolute on the driver: by default it follows the working folder,
    and a worker must write where the driver reads. (Run folders keep their paths, relative ones included, so a
    run's configuration hashes the same whichever executor made it: tasks run in the driver's working folder.)"""
    uri = tracking.tracking_uri(cfg.mlflow)
    if uri.startswith("sqlite:///"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
        log.warning("ablation %s on Ray tracks into the SQLite file %s: fine for a few workers on one machine; on a "
                    "cluster, or with many workers, use a tracking server (mlflow.tracking_uri=http://HOST:5000)",
                    cfg.name, uri[len("sqlite:///"):])
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})


def _check_resources(r: RayConfig, available: dict) -> None:
    """Refuse task requests the Ray cluster can never meet (Ray would wait for them forever)."""
    for stage, res in (("pretrain", r.pretrain), ("finetune", r.finetune)):
        for key, want in (("CPU", res.num_cpus), ("GPU", res.num_gpus)):
            have = float(available.get(key, 0.0))
            if want > have:
                raise ValueError(f"ray.{stage}.num_{key.lower()}s={want:g} but the Ray cluster has {have:g} {key}(s): "
                                 f"no {stage} task could ever start")


def _run_on_ray(cfg: AblationConfig, parent: str | None, clock: _Timings, failures: list[str]) -> None:
    """One Ray task per distinct pretraining (methods that share one, like ``ddpm-features`` and ``diffusion``, share
    the task) and one per fine-tune, with the declared resources; a fine-tune takes its pretraining's result as an
    argument, so Ray starts it once that pretraining is done. The driver records results and failures as tasks
    finish; a killed driver loses nothing finished (the runs' folders say so)."""
    try:
        import ray  # an optional extra: medhybrid[ray]
    except ImportError as e:
        raise RuntimeError("executor=ray needs Ray: pip install 'medhybrid[ray]'") from e

    cfg = _pinned_for_workers(cfg)
    started_here = not ray.is_initialized()
    if started_here:
        _start_ray(ray, cfg.ray)
    try:
        _check_resources(cfg.ray, ray.cluster_resources())
        sharing, pre_refs, pending = _submit(ray, cfg, os.getcwd(), parent)
        _collect(ray, cfg, sharing, pre_refs, pending, clock, failures)
    finally:
        if started_here:
            ray.shutdown()


def _start_ray(ray, r: RayConfig) -> None:
    """Join the cluster at ``r.address``, or start a local one with the declared CPUs, GPUs and object store."""
    init: dict[str, Any] = {"address": r.address, "include_dashboard": False, "log_to_driver": True}
    if r.address is None:
        init.update(num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                    object_store_memory=r.object_store_mb * 2**20 if r.object_store_mb else None)
    ray.init(**{k: v for k, v in init.items() if v is not None or k == "address"})


def _submit(ray, cfg: AblationConfig, cwd: str, parent: str | None) -> tuple[dict, dict, dict]:
    """Submit every task: ``(sharing, pre_refs, pending)``: the methods sharing each pretraining, each pretraining's
    task, and what each pending task is (``("pretrain", key)`` or ``("finetune", key, method, tag)``)."""
    r = cfg.ray
    pre_task = ray.remote(_timed_pretrain).options(num_cpus=r.pretrain.num_cpus, num_gpus=r.pretrain.num_gpus, max_retries=0)
    ft_task = ray.remote(_finetune_after).options(num_cpus=r.finetune.num_cpus, num_gpus=r.finetune.num_gpus, max_retries=0)
    sharing: dict[str, list[str]] = {}
    for method in cfg.methods:
        sharing.setdefault(pretraining_of(cfg, method), []).append(method)
    pre_refs = {key: pre_task.remote(cwd, cfg, methods[0]) for key, methods in sharing.items()}
    pending: dict = {ref: ("pretrain", key) for key, ref in pre_refs.items()}
    for key, methods in sharing.items():
        for method in methods:
            for budget in cfg.budgets:
                for seed in cfg.seeds_for(budget):
                    ref = ft_task.remote(cwd, cfg, method, pre_refs[key], budget, seed, parent)
                    pending[ref] = ("finetune", key, method, RunKey(method, budget, seed).tag)
    return sharing, pre_refs, pending


def _collect(ray, cfg: AblationConfig, sharing: dict, pre_refs: dict, pending: dict, clock: _Timings,
             failures: list[str]) -> None:
    """Wait for every task in finishing order, adding its timings to ``clock`` or recording its failure (a fine-tune
    whose pretraining failed never ran: only the pretraining is recorded)."""
    from ray.exceptions import RayError, RayTaskError

    def pretraining_failed(key: str) -> bool:
        try:
            ray.get(pre_refs[key])
            return False
        except RayError:
            return True

    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        item = pending.pop(done[0])
        try:
            out = ray.get(done[0])
        except RayError as e:
            cause = e.cause if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else e
            if item[0] == "pretrain":  # recorded once per method that needed it, as the sequential runner does
                for method in sharing[item[1]]:
                    _record_failure(cfg, failures, f"pretrain {method}", cause, str(e))
            elif not pretraining_failed(item[1]):
                _record_failure(cfg, failures, item[3], cause, str(e))
            continue
        if item[0] == "pretrain":
            clock.add(sharing[item[1]][0], pretrain_s=out[1])
        else:
            clock.add(item[2], train_s=out.get("train_s", 0.0), eval_s=out.get("eval_s", 0.0))


def run_ablation(cfg: AblationConfig) -> dict:
    """Run (or resume) the whole ablation and write its report. Returns the report's paths and failures.

    ``cfg.executor`` ``sequential`` runs everything here, one run after another; ``ray`` runs the same steps as Ray
    tasks (:func:`_run_on_ray`). Both skip finished runs, record failures without stopping, and give the same runs."""
    folder = cfg.folder
    folder.mkdir(parents=True, exist_ok=True)
    with runs.experiment(folder, cfg.mlflow, cfg.mlflow.run_name or f"ablation-{cfg.name}",
                         params={"methods": ",".join(cfg.methods), "budgets": str(cfg.budgets), "seeds": str(cfg.seeds),
                                 "source": cfg.source.name, "target": cfg.target.name},
                         tags={"medhybrid.stage": "ablation", "domain": cfg.target.name, "ablation": cfg.name}) as parent:
        save_config(cfg, folder / "config.yaml")
        failures: list[str] = []
        clock = _Timings(folder)
        clock.entry["executor"] = cfg.executor
        (_run_on_ray if cfg.executor == "ray" else _run_sequential)(cfg, parent, clock, failures)
        wall = clock.save()
        if parent:
            tracking.log_metrics(cfg.mlflow, parent, {"wall_s": wall}, step=len(clock.history))
        prepare_report(cfg, parent)  # the paired statistics and samples the report reads: computed once, kept in the folder
        report = write_report(cfg, folder / "report", parent_run_id=parent)
        if parent:
            for p in report.values():
                tracking.log_artifact(cfg.mlflow, parent, p, "report")
            tracking.finish_run(cfg.mlflow, parent, "FAILED" if failures else "FINISHED")
    return {"report": report, "failures": failures, "parent_run_id": parent}


def load_ablation(path: str, profile: str, overrides: list[str]):
    """An ablation config with one of its ``profiles`` (quick, standard, full) merged over the shared part. A profile's
    ``methods`` may be a list of names: it then runs that selection of the methods defined at the top level."""
    p = find_config(path, "ablation")
    data = read_yaml(p)
    profiles = data.pop("profiles", {}) or {}
    defined = data.get("methods") or DEFAULT_METHODS
    data = deep_merge(data, _profile(profiles, profile, p))
    data.setdefault("name", f"{p.stem}-{profile}")
    data = apply_overrides(data, overrides)
    if isinstance(data.get("methods"), list):  # a profile (or methods=[a,b]) runs a selection of the defined methods
        unknown = [m for m in data["methods"] if m not in defined]
        if unknown:
            raise ConfigError(f"{p} [{profile}]: methods {unknown} are not defined (defined: {sorted(defined)})")
        data["methods"] = {m: defined[m] for m in data["methods"]}
    return validate(AblationConfig, data, source=f"{p} [{profile}]", context={"base_dir": p.parent})


def _profile(profiles: dict, name: str, path: Path, seen: tuple[str, ...] = ()) -> dict:
    """Profile ``name``, with the profile it ``extends`` (if any) merged under it."""
    if name not in profiles:
        raise ConfigError(f"{path}: no profile {name!r} (profiles: {sorted(profiles)})")
    if name in seen:
        raise ConfigError(f"{path}: profiles extend each other in a loop: {' -> '.join((*seen, name))}")
    prof = dict(profiles[name])
    base = prof.pop("extends", None)
    return deep_merge(_profile(profiles, base, path, (*seen, name)), prof) if base else prof


__all__ = ["AblationConfig", "DEFAULT_METHODS", "finetune_config", "finetune_step", "load_ablation", "MethodSpec",
           "pixel_features_config", "pretrain_config", "pretrain_step", "pretraining_of", "RayConfig", "zero_shot_step",
           "run_ablation", "TaskResources"]
