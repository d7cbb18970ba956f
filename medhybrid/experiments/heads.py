"""The ablation's fine-tuning heads, each one small object: what a method trains on a labelled subset after its
pretraining, and how that is scored.

- ``finetune``: the whole pretrained network fine-tuned on the few labels (:mod:`medhybrid.workflows.finetune`);
- ``ddpm-features``: frozen decoder activations of a generatively pretrained network at a few noise levels, and an
  ensemble of small per-pixel MLPs (Baranchuk et al., ICLR 2022; :mod:`medhybrid.experiments.pixel_features`);
- ``nnunet``: nnU-Net v2 trained from scratch on the same labels, its own network and schedule
  (:mod:`medhybrid.experiments.nnunet`).

A head says, in one place, which pretrainings it accepts (:meth:`Head.check`), the config of one run
(:meth:`Head.config`) and how that run trains and is scored (:meth:`Head.run`). A new head is one new subclass here,
decorated with :func:`register`; an ablation's methods name it by ``name`` (``head: ddpm-features``).

Every few-shot run of an ablation is named by one :class:`RunKey` (method, budget, seed): its tag, folder and MLflow
run name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from medhybrid.core import runs
from medhybrid.core.config import StrictModel, deep_merge, dump_config, validate
from medhybrid.core.registry import Registry
from medhybrid.data.datasets import few_shot_pairs
from medhybrid.data.specs import Preprocess
from medhybrid.experiments.nnunet import NnunetConfig, run_nnunet
from medhybrid.experiments.pixel_features import PixelFeaturesConfig, load_feature_segmenter, run_pixel_features
from medhybrid.networks.checkpoints import load_model, model_meta
from medhybrid.workflows.adapt import AdaptConfig, run_adaptation
from medhybrid.workflows.fewshot import evaluate_few_shot_run
from medhybrid.workflows.finetune import FinetuneConfig, run_finetuning

if TYPE_CHECKING:
    from medhybrid.experiments.ablation import AblationConfig, MethodSpec

__all__ = ["Adapt", "DDPMFeatures", "Finetune", "Head", "NnUNet", "RunKey", "get_head", "head_names", "register"]


@dataclass(frozen=True)
class RunKey:
    """A few-shot run of an ablation: ``method`` on the labelled subset (``budget``, ``seed``); ``budget`` None is the
    whole pool, written ``all``. The one place its names are built."""

    method: str
    budget: int | None
    seed: int

    @property
    def budget_label(self) -> str:
        return "all" if self.budget is None else str(self.budget)

    @property
    def tag(self) -> str:
        """``hybrid b5 s0``: how logs and failure records name the run."""
        return f"{self.method} b{self.budget_label} s{self.seed}"

    @property
    def folder_name(self) -> str:
        """``b5-s0``: the run's folder under ``<ablation>/finetune/<method>/``."""
        return f"b{self.budget_label}-s{self.seed}"

    def run_name(self, ablation: str) -> str:
        """The MLflow run name: ``<ablation>-<method>-b5-s0``."""
        return f"{ablation}-{self.method}-{self.folder_name}"


_REGISTRY: Registry[Head] = Registry("fine-tuning head")
register = _REGISTRY.register
"""Class decorator: make the head available by its ``name``."""
get_head = _REGISTRY.get
"""The registered head called ``name``; ValueError naming the known ones otherwise."""
head_names = _REGISTRY.names


def few_shot_fields(cfg: AblationConfig, key: RunKey, parent: str | None, pretrain_run: str | None) -> dict:
    """The fields every few-shot run of the ablation sets: target, subset, folder, parent run and tags."""
    return dict(dataset=cfg.target.model_dump(), method=key.method, budget=key.budget, seed=key.seed,
                output_dir=str(cfg.folder / "finetune" / key.method / key.folder_name), parent_run_id=parent,
                tags={"pretrain_run_id": pretrain_run or "", "ablation": cfg.name},
                mlflow=deep_merge(dump_config(cfg.mlflow), {"run_name": key.run_name(cfg.name)}))


class Head:
    """One way to train on a labelled subset after a pretraining. Subclasses set ``name`` and implement
    :meth:`config` and :meth:`train`; :meth:`run` trains and scores."""

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()
    """The run-config fields a method may set under ``adapt`` (``MethodSpec.adapt``); none for most heads."""

    def check(self, spec: MethodSpec) -> None:
        """Raise ValueError when a method's pretraining does not suit this head (at config time)."""

    def config(self, cfg: AblationConfig, key: RunKey, pre, parent: str | None) -> StrictModel:
        """The run's config: the subset ``key`` after the pretraining ``pre`` (its ``checkpoint``, ``run_id``)."""
        raise NotImplementedError

    def train(self, run_cfg) -> tuple:
        """Train (or find the finished run of) ``run_cfg``: ``(its MLflow run id, the network, its Preprocess)``."""
        raise NotImplementedError

    def run(self, cfg: AblationConfig, run_cfg, seed: int) -> tuple[dict, float]:
        """Train and score on the ablation's evaluation set: ``(summary, training seconds)``."""
        t0 = time.perf_counter()
        run_id, net, preprocess = self.train(run_cfg)
        train_s = time.perf_counter() - t0
        summary = evaluate_few_shot_run(cfg.mlflow, run_cfg.folder, run_id, net, run_cfg.dataset, preprocess,
                                        cfg.eval_pairs(seed))
        return summary, train_s


@register
class Finetune(Head):
    """The whole network fine-tuned on the labelled subset (and, for a semi-supervised method, the pool's other
    images without their masks)."""

    name = "finetune"

    def config(self, cfg, key, pre, parent):
        return finetune_config(cfg, key.method, pre.checkpoint, key.budget, key.seed, parent, pre.run_id)

    def train(self, run_cfg):
        res = run_finetuning(run_cfg)
        net, _ = load_model(res.checkpoint)
        return res.run_id, net, run_cfg.preprocess


@register
class DDPMFeatures(Head):
    """Frozen decoder features of a generatively pretrained network + an MLP ensemble (Baranchuk et al. 2022)."""

    name = "ddpm-features"

    def check(self, spec):
        if spec.pretrain in ("none", "supervised"):
            raise ValueError(f"ddpm-features needs a generatively pretrained network (diffusion, hybrid or mdm), not "
                             f"{spec.pretrain!r}")

    def config(self, cfg, key, pre, parent):
        return pixel_features_config(cfg, key.method, pre.checkpoint, key.budget, key.seed, parent, pre.run_id)

    def train(self, run_cfg):
        res = run_pixel_features(run_cfg)
        net, meta = load_feature_segmenter(res.checkpoint)
        return res.run_id, net, Preprocess(**meta["preprocess"])


@register
class Adapt(Head):
    """Self-checking adaptation (:mod:`medhybrid.workflows.adapt`): the pretrained model is kept unless held-out
    evidence on the subset's own labels picks a fine-tune (plain, robust or FixMatch, each at a WiSE-FT mix). The
    pool's other images are its unlabelled images (a development set's are never read)."""

    name = "adapt"

    settings = ("rule", "recipes", "wise", "max_loo", "folds")  # of AdaptConfig; data, model and run are the ablation's

    def check(self, spec):
        if spec.pretrain == "none":
            raise ValueError("head adapt checks a fine-tune against its starting model: it needs a pretraining, not none")

    def config(self, cfg, key, pre, parent):
        spec = cfg.methods[key.method]
        ids = [p["id"] for p in few_shot_pairs(cfg.target, key.budget, key.seed)]
        dev = cfg.eval_pairs(key.seed)
        data = {"model": str(pre.checkpoint), "data": cfg.target.model_dump(), "labelled": ids, "unlabelled_pool": True,
                "unlabelled_exclude": sorted(p["id"] for p in dev) if dev is not None else [],
                "output_dir": str(cfg.folder / "finetune" / key.method / key.folder_name), "parent_run_id": parent,
                "finetune": deep_merge(cfg.finetune, spec.finetune), "seed": key.seed, "progress": False,
                "tags": {"pretrain_run_id": pre.run_id or "", "ablation": cfg.name, "method": key.method,
                         "budget": key.budget_label, "seed": str(key.seed)},
                "mlflow": deep_merge(dump_config(cfg.mlflow), {"run_name": key.run_name(cfg.name)}), "check_data": False,
                **spec.adapt}
        return validate(AdaptConfig, data, source=f"ablation {cfg.name} {key.tag}")

    def train(self, run_cfg):
        res = run_adaptation(run_cfg)
        net, meta = load_model(res.model)
        return res.run_id, net, Preprocess(**meta["preprocess"])


@register
class NnUNet(Head):
    """nnU-Net v2 on the same labelled subset: its own planned network, schedule and augmentation, trained from
    scratch, predicting and scored in its own run."""

    name = "nnunet"

    def check(self, spec):
        if spec.pretrain != "none":
            raise ValueError(f"head nnunet trains nnU-Net's own network from scratch: pretrain must be none, not {spec.pretrain!r}")

    def config(self, cfg, key, pre, parent):
        return nnunet_config(cfg, key.method, key.budget, key.seed, parent)

    def run(self, cfg, run_cfg, seed):
        train_s = run_nnunet(run_cfg).train_s  # its scoring (after training) counts as evaluation
        return runs.scores(runs.read_state(run_cfg.folder))[1], train_s


# ------------------------------------------------------------------------------------------ the heads' run configs
def finetune_config(cfg: AblationConfig, method: str, init: Path, budget: int | None, seed: int, parent: str | None,
                    pretrain_run: str | None) -> FinetuneConfig:
    key = RunKey(method, budget, seed)
    meta = model_meta(init)
    spec = cfg.methods[method]
    data = deep_merge(deep_merge(cfg.finetune, spec.finetune), few_shot_fields(cfg, key, parent, pretrain_run))
    data.update(init=str(init) if spec.pretrain != "none" else None, preprocess=meta["preprocess"], model=meta["model"])
    dev = cfg.eval_pairs(seed)
    if dev is not None and spec.semi_supervised:  # a development image is scored, never trained on, not even unlabelled
        data["unlabelled_exclude"] = sorted(p["id"] for p in dev)
    return validate(FinetuneConfig, data, source=f"ablation {cfg.name} finetune {key.tag}")


def nnunet_config(cfg: AblationConfig, method: str, budget: int | None, seed: int, parent: str | None) -> NnunetConfig:
    """The nnU-Net run of ``method`` on the subset (budget, seed): the same subset, folder layout and MLflow child run as
    every fine-tune, its images exported at the pretraining's resolution (what the other networks see)."""
    key = RunKey(method, budget, seed)
    data = deep_merge({"resolution": cfg.resolution, **cfg.nnunet}, few_shot_fields(cfg, key, parent, None))
    dev = cfg.eval_pairs(seed)
    if dev is not None:
        data["eval_ids"] = [p["id"] for p in dev]
    return validate(NnunetConfig, data, source=f"ablation {cfg.name} {key.tag}")


def pixel_features_config(cfg: AblationConfig, method: str, init: Path, budget: int | None, seed: int,
                          parent: str | None, pretrain_run: str | None) -> PixelFeaturesConfig:
    key = RunKey(method, budget, seed)
    try:
        get_head("ddpm-features").check(cfg.methods[method])
    except ValueError as e:
        raise ValueError(f"method {method!r}: {e}") from None
    data = deep_merge(cfg.pixel_features, few_shot_fields(cfg, key, parent, pretrain_run))
    data.update(init=str(init))
    return validate(PixelFeaturesConfig, data, source=f"ablation {cfg.name} {key.tag}")
