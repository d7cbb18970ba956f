"""The few-shot run on a target domain: what fine-tuning (:mod:`medhybrid.workflows.finetune`) and the DDPM-features head
(:mod:`medhybrid.experiments.pixel_features`) share, from its config to its score.

1. :class:`FewShotRunConfig`: the labelled subset (``budget`` pool images for ``seed``, or explicit ``ids``), the
   starting checkpoint, the folder and the MLflow child run;
2. :func:`claim_few_shot_run`: the run's identity (:func:`few_shot_hash`) claims its folder, or finds it finished;
3. :func:`open_few_shot_run`: resolved ``config.yaml``, ``subset.json``, ``state.json`` and the MLflow run;
4. the method trains (and closes the run with :meth:`medhybrid.core.runs.Run.finish`);
5. :func:`evaluate_few_shot_run`: the score on the target's test split (or a development set), recorded once.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from medhybrid.core import runs, tracking
from medhybrid.core.config import StrictModel, dump_config
from medhybrid.core.files import write_json
from medhybrid.core.runs import config_hash
from medhybrid.core.tracking import MLflowConfig
from medhybrid.data.specs import DatasetRef, DatasetSpec
from medhybrid.workflows.evaluate import evaluate


class FewShotRunConfig(StrictModel):
    """What every few-shot run on a target domain has: the labelled subset (``budget`` pool images for
    ``seed``), its starting checkpoint, its folder and its MLflow child run. Fine-tuning and DDPM
    features (:mod:`medhybrid.experiments.pixel_features`) extend it."""

    dataset: DatasetRef
    init: Path | None = Field(None, description="pretrained model.pt")
    method: str = Field("custom", description="name used in reports and MLflow tags")
    budget: int | None = Field(5, description="labelled pool images; None = the whole pool")
    seed: int = 0
    ids: list[str] | None = Field(None, description="the pool ids to label, in the order they were chosen (an active-learning "
                                  "order, :mod:`medhybrid.experiments.active`) instead of the seeded draw; budget must then "
                                  "be None or len(ids)")
    output_dir: Path | None = None
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    parent_run_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)

    runs_subdir: ClassVar[str] = "finetune"
    what: ClassVar[str] = "few-shot fine-tuning"
    product: ClassVar[str] = "model.pt"
    """What a finished run of this kind leaves in its folder (:meth:`medhybrid.core.runs.Run.claim`)."""

    @field_validator("dataset")
    @classmethod
    def _target(cls, v: DatasetSpec) -> DatasetSpec:
        if v.role != "target":
            raise ValueError(f"dataset {v.name!r} is a {v.role} dataset; {cls.what} draws from a target's pool")
        return v

    @model_validator(mode="after")
    def _ids_match_budget(self):
        if self.ids is not None:
            if not self.ids or len(set(self.ids)) != len(self.ids):
                raise ValueError(f"ids must be distinct pool ids, at least one, got {self.ids}")
            if self.budget is not None and self.budget != len(self.ids):
                raise ValueError(f"budget {self.budget} does not match the {len(self.ids)} ids given")
        return self

    @field_validator("init")
    @classmethod
    def _init_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"pretrained checkpoint {v} not found")
        return v

    @property
    def folder(self) -> Path:
        b = len(self.ids) if self.ids is not None else "all" if self.budget is None else self.budget
        return Path(self.output_dir or Path("runs") / self.runs_subdir / f"{self.dataset.name}-{self.method}-b{b}-s{self.seed}")


FEW_SHOT_UNHASHED = ("mlflow", "output_dir", "parent_run_id", "tags")
"""Config fields that do not change a few-shot run's result (left out of its config hash)."""


def few_shot_hash(cfg: FewShotRunConfig) -> str:
    """The config hash of a few-shot run. ``ids`` (unset) and ``semi`` (plain fine-tuning) are left out while they keep
    their defaults, so runs from before they existed keep their hash."""
    unset = ("ids",) if cfg.ids is None else ()
    semi = getattr(cfg, "semi", None)
    if semi is not None and not semi.enabled:
        unset += ("semi",)
    return config_hash(cfg, exclude=FEW_SHOT_UNHASHED + unset)


def claim_few_shot_run(cfg: FewShotRunConfig) -> runs.Run:
    """Claim ``cfg.folder`` for this run (:class:`medhybrid.core.runs.Run`; ``run.finished``: nothing left to do)."""
    return runs.Run.claim(cfg.folder, few_shot_hash(cfg), cfg.mlflow, cfg.product)


def require_channels(meta: dict, cfg: FewShotRunConfig) -> None:
    """A checkpoint (its ``meta``) must take the target's image channels."""
    if meta["image_channels"] != cfg.dataset.channels:
        raise ValueError(f"{cfg.init}: pretrained on {meta['image_channels']}-channel images, target "
                         f"{cfg.dataset.name!r} has {cfg.dataset.channels}")


def open_few_shot_run(cfg: FewShotRunConfig, run: runs.Run, ids: list[str]) -> str | None:
    """Start (or reopen) a few-shot run: ``subset.json`` (the labelled ids) beside :meth:`medhybrid.core.runs.Run.start`'s
    config, state and MLflow child run tagged method, budget, seed and domain. Returns the MLflow run id (None with
    MLflow off)."""
    budget = len(ids)
    write_json(cfg.folder / "subset.json", {"budget": budget, "seed": cfg.seed, "ids": ids}, indent=1)
    tags = {"medhybrid.stage": "finetune", "method": cfg.method, "budget": str(budget), "seed": str(cfg.seed),
            "domain": cfg.dataset.name, **cfg.tags}
    return run.start(cfg, cfg.mlflow.run_name or f"finetune-{cfg.method}-b{budget}-s{cfg.seed}", params=dump_config(cfg),
                     tags=tags, parent_run_id=cfg.parent_run_id, ids=ids)


def evaluate_few_shot_run(mlflow: MLflowConfig, folder: Path, run_id: str | None, net, dataset, preprocess,
                          pairs: list[dict] | None = None) -> dict[str, float]:
    """Score the finished few-shot run in ``folder`` on the target's test split (or ``pairs``, a development set):
    per-image CSV and overlays in ``folder/eval``, the summary logged to its MLflow run and kept in ``state.json``
    (``evaluated``, ``scored_on``, ``scores``) so a resumed experiment does not score it again. Returns the summary."""
    ev = evaluate(net, dataset, preprocess, "test" if pairs is None else "dev", out_dir=folder / "eval", pairs=pairs)
    return record_scores(mlflow, folder, run_id, ev)


def record_scores(mlflow: MLflowConfig, folder: Path, run_id: str | None, ev) -> dict[str, float]:
    """Keep an evaluation of the run in ``folder``: its summary logged to the MLflow run with the per-image CSV, and in
    ``state.json`` (``evaluated``, ``scored_on``, ``scores``). Returns the summary."""
    if run_id:
        tracking.log_metrics(mlflow, run_id, ev.summary, step=0)
        tracking.log_artifact(mlflow, run_id, ev.csv, "eval")
    runs.write_state(folder, evaluated=True, scored_on=ev.split, scores=ev.summary)
    return ev.summary


__all__ = ["claim_few_shot_run", "evaluate_few_shot_run", "record_scores", "few_shot_hash", "FEW_SHOT_UNHASHED", "FewShotRunConfig",
           "open_few_shot_run", "require_channels"]
