"""The label-budget ablation: methods x budgets x seeds, in one command.

One pretraining per method and domain is reused across budgets and seeds. Each fine-tune is its own
MLflow run (tags: method, budget, seed, domain, pretrain run id) under one parent run. The runner is
resumable (finished fine-tunes are skipped) and a failed run is recorded and does not stop the others.
The report (:mod:`medhybrid.report`) is built from the MLflow runs themselves.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from medhybrid.config import DatasetSpec, StrictModel, dump_config, load_dataset_spec, save_config
from medhybrid.tracking import MLflowConfig

log = logging.getLogger("medhybrid")

DEFAULT_METHODS = {
    "scratch": {"pretrain": "none"},
    "supervised": {"pretrain": "supervised"},
    "diffusion": {"pretrain": "diffusion"},
    "hybrid": {"pretrain": "hybrid"},
    "mdm": {"pretrain": "mdm"},
}


class MethodSpec(StrictModel):
    pretrain: str = Field(description="pretraining mode: none, supervised, diffusion, hybrid, mdm")
    overrides: dict[str, Any] = Field(default_factory=dict, description="pretrain config overrides for this method")


class AblationConfig(StrictModel):
    name: str
    source: DatasetSpec
    target: DatasetSpec
    methods: dict[str, MethodSpec] = Field(default_factory=lambda: {k: MethodSpec(**v) for k, v in DEFAULT_METHODS.items()})
    budgets: list[int | None] = Field(default_factory=lambda: [1, 2, 5, 10, 20, 50, None],
                                      description="labelled images; null = the whole pool")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    output_dir: Path | None = None
    pretrain: dict[str, Any] = Field(default_factory=dict, description="shared PretrainConfig fields")
    finetune: dict[str, Any] = Field(default_factory=dict, description="shared FinetuneConfig fields")
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    reference: str = Field("hybrid", description="method compared against each baseline in the report")

    @field_validator("source", "target", mode="before")
    @classmethod
    def _dataset(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, (str, Path)):
            return load_dataset_spec(v, base_dir=(info.context or {}).get("base_dir"))
        return v

    @property
    def folder(self) -> Path:
        return Path(self.output_dir or Path("runs") / "ablation" / self.name)


def _merge(base: dict, over: dict) -> dict:
    from medhybrid.config import deep_merge

    return deep_merge(base, over)


def pretrain_config(cfg: AblationConfig, method: str):
    from medhybrid.config import validate
    from medhybrid.pretrain import PretrainConfig

    spec = cfg.methods[method]
    data = _merge(cfg.pretrain, spec.overrides)
    data.update(mode=spec.pretrain, dataset=cfg.source.model_dump(), output_dir=str(cfg.folder / "pretrain" / method),
                mlflow=_merge(dump_config(cfg.mlflow), {"run_name": f"{cfg.name}-pretrain-{method}"}))
    return validate(PretrainConfig, data, source=f"ablation {cfg.name} pretrain {method}")


def finetune_config(cfg: AblationConfig, method: str, init: Path, budget: int | None, seed: int, parent: str | None,
                    pretrain_run: str | None):
    from medhybrid.config import validate
    from medhybrid.finetune import FinetuneConfig
    from medhybrid.pretrain import load_model

    meta = load_model(init)[1]
    b = "all" if budget is None else budget
    data = _merge(cfg.finetune, {})
    data.update(dataset=cfg.target.model_dump(), init=str(init) if cfg.methods[method].pretrain != "none" else None,
                method=method, budget=budget, seed=seed, output_dir=str(cfg.folder / "finetune" / method / f"b{b}-s{seed}"),
                preprocess=meta["preprocess"], model=meta["model"], parent_run_id=parent,
                tags={"pretrain_run_id": pretrain_run or "", "ablation": cfg.name},
                mlflow=_merge(dump_config(cfg.mlflow), {"run_name": f"{cfg.name}-{method}-b{b}-s{seed}"}))
    return validate(FinetuneConfig, data, source=f"ablation {cfg.name} finetune {method} b{b} s{seed}")


def run_ablation(cfg: AblationConfig) -> dict:
    """Run (or resume) the whole ablation and write its report. Returns the report's paths and failures."""
    from medhybrid import tracking
    from medhybrid.evaluate import evaluate
    from medhybrid.finetune import run_finetuning
    from medhybrid.pretrain import load_model, run_pretraining
    from medhybrid.report import write_report

    folder = cfg.folder
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    parent = None
    if cfg.mlflow.enabled:
        parent = tracking.open_run(cfg.mlflow, folder, cfg.mlflow.run_name or f"ablation-{cfg.name}",
                                   params={"methods": ",".join(cfg.methods), "budgets": str(cfg.budgets),
                                           "seeds": str(cfg.seeds), "source": cfg.source.name, "target": cfg.target.name},
                                   tags={"medhybrid.stage": "ablation", "domain": cfg.target.name, "ablation": cfg.name})
    failures: list[str] = []
    for method in cfg.methods:
        try:
            pre = run_pretraining(pretrain_config(cfg, method))
        except Exception as e:
            log.error("ablation %s: pretraining %s failed: %s", cfg.name, method, e)
            failures.append(f"pretrain {method}: {type(e).__name__}: {e}")
            (folder / "failures.log").open("a").write(f"pretrain {method}\n{traceback.format_exc()}\n")
            continue
        for budget in cfg.budgets:
            for seed in cfg.seeds:
                tag = f"{method} b{'all' if budget is None else budget} s{seed}"
                try:
                    fcfg = finetune_config(cfg, method, pre.checkpoint, budget, seed, parent, pre.run_id)
                    st = tracking.read_state(fcfg.folder)
                    if st.get("status") == "finished" and st.get("evaluated"):
                        log.info("ablation %s: %s already done, skipped", cfg.name, tag)
                        continue
                    res = run_finetuning(fcfg)
                    net, _ = load_model(res.checkpoint)
                    ev = evaluate(net, fcfg.dataset, fcfg.preprocess, "test", out_dir=fcfg.folder / "eval")
                    if res.run_id:
                        tracking.log_metrics(cfg.mlflow, res.run_id, ev.summary, step=0)
                        tracking.log_artifact(cfg.mlflow, res.run_id, ev.csv, "eval")
                    tracking.write_state(fcfg.folder, evaluated=True, test=ev.summary)
                    log.info("ablation %s: %s test dice %.4f", cfg.name, tag, ev.summary["test_dice"])
                except Exception as e:
                    log.error("ablation %s: %s failed: %s", cfg.name, tag, e)
                    failures.append(f"{tag}: {type(e).__name__}: {e}")
                    (folder / "failures.log").open("a").write(f"{tag}\n{traceback.format_exc()}\n")
    report = write_report(cfg, folder / "report", parent_run_id=parent)
    if parent:
        for p in report.values():
            tracking.log_artifact(cfg.mlflow, parent, p, "report")
        tracking.finish_run(cfg.mlflow, parent, "FAILED" if failures else "FINISHED")
    return {"report": report, "failures": failures, "parent_run_id": parent}
