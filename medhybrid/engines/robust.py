"""Robust fine-tuning: ways to keep a pretrained network's knowledge while it learns a few target labels, each one
option of :class:`RobustConfig` (all off by default) that :func:`medhybrid.workflows.finetune.run_finetuning` plugs into
MONAI's ``SupervisedTrainer`` (:func:`medhybrid.engines.fit.fit`) through its seams.

- L2-SP (Li, Grandvalet & Davoine, ICML 2018, "Explicit inductive bias for transfer learning with convolutional
  networks"): the penalty Omega(w) = alpha/2 ||w_S - w_S^0||^2 + beta/2 ||w_Sbar||^2 (eq. 4) added to the loss
  (:func:`l2sp_penalty`, :class:`L2SPLoss`): the weights S transferred from the pretrained model are pulled towards
  their starting values w^0, the new ones Sbar (a re-initialised output head) get plain weight decay.
- Partial (surgical) fine-tuning (Lee et al., ICLR 2023, "Surgical fine-tuning improves adaptation to distribution
  shifts"): only the parameters whose names match ``trainable`` (regular expressions, or the named
  :data:`PRESETS`) are trained; the others are frozen with MONAI's ``freeze_layers`` (``requires_grad = False``: they
  get no gradient, so the optimiser, weight decay included, leaves them exactly as they were) (:func:`freeze`).
- Source rehearsal (replay, as in continual learning: the source's labelled images kept in the fine-tuning batches so
  the source task is not forgotten while the target is learnt): a ``share`` of each batch drawn from the source's
  labelled images with their masks (:class:`RehearsalConfig`; the batches are built by
  :class:`medhybrid.engines.batches.MixedBatchSampler`, target rows then source rows).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from monai.networks.utils import freeze_layers
from pydantic import Field, field_validator, model_validator
from torch import nn

from medhybrid.core.config import StrictModel, dump_config
from medhybrid.data.specs import DatasetRef
from medhybrid.data.unlabelled import HELD_OUT_SPLITS

log = logging.getLogger("medhybrid")

# --------------------------------------------------------------------------------------------- partial fine-tuning
# Parameter names of medhybrid's network (:func:`medhybrid.networks.nets.build_network`): an ``EDMPrecond`` around
# MONAI's ``DiffusionModelUNet``, ``backbone.conv_in``, ``backbone.time_embed``, ``backbone.down_blocks.<i>`` (the
# encoder), ``backbone.middle_block``, ``backbone.up_blocks.<i>`` (the decoder) and ``backbone.out`` (GroupNorm ``out.0``,
# SiLU, output convolution ``out.2.conv``). The normalisation layers are GroupNorms named ``norm1``/``norm2`` (residual
# blocks), ``norm`` (attention blocks) and ``out.0``.
DECODER = (r"^backbone\.up_blocks\.", r"^backbone\.out\.")
"""The U-Net's up path and its output block (GroupNorm and output convolution)."""
NORMS = (r"\.norm\d*\.(weight|bias)$", r"^backbone\.out\.0\.(weight|bias)$")
"""Every normalisation layer's affine parameters (the GroupNorms)."""
BIASES = (r"\.bias$",)
"""Every bias."""
HEAD = (r"^backbone\.out\.2\.conv\.",)
"""The output convolution alone (:data:`medhybrid.networks.checkpoints.HEAD`): a linear probe's analogue."""

PRESETS: dict[str, tuple[str, ...]] = {
    "decoder": DECODER,
    "norms-biases": NORMS + BIASES,
    "decoder+norms": DECODER + NORMS,
    "head": HEAD,
}
"""Named sets of patterns a config's ``trainable`` may give instead of (or beside) regular expressions."""


def trainable_patterns(trainable: Iterable[str]) -> list[str]:
    """The regular expressions of ``trainable``: a preset name (:data:`PRESETS`) stands for its patterns, anything
    else is a pattern itself."""
    return [p for t in trainable for p in PRESETS.get(t, (t,))]


def trainable_regex(trainable: Iterable[str]) -> str:
    """One regular expression matching (``re.search``) the names any entry of ``trainable`` matches."""
    return "|".join(f"(?:{p})" for p in trainable_patterns(trainable))


def trainable_names(network: nn.Module, trainable: Iterable[str]) -> list[str]:
    """The names of ``network``'s parameters that ``trainable`` selects, in the network's order."""
    rx = re.compile(trainable_regex(trainable))
    return [k for k, _ in network.named_parameters() if rx.search(k)]


def freeze(network: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Freeze (``requires_grad = False``, MONAI's ``freeze_layers``) every parameter of ``network`` that ``trainable``
    does not select; the names still trained. A frozen parameter never gets a gradient, so neither the optimiser's
    step nor its weight decay moves it. Raises ValueError when nothing would be trained."""
    names = trainable_names(network, trainable)
    if not names:
        raise ValueError(f"trainable {list(trainable)} matches no parameter of the network (names look like "
                         f"{next(iter(dict(network.named_parameters())))!r}; presets: {', '.join(PRESETS)})")
    freeze_layers(network, exclude_vars=trainable_regex(trainable))
    total = sum(1 for _ in network.parameters())
    log.info("partial fine-tuning (%s): %d of %d parameter tensors trained, the others frozen", ", ".join(trainable),
             len(names), total)
    return names


# --------------------------------------------------------------------------------------------- L2-SP
def l2sp_penalty(weights: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], alpha: float,
                 beta: float) -> torch.Tensor:
    """L2-SP's regulariser (Li, Grandvalet & Davoine 2018, eq. 4), a scalar:

        Omega(w) = alpha/2 ||w_S - w_S^0||^2 + beta/2 ||w_Sbar||^2

    ``weights``: the parameters w by name; ``start``: w_S^0, the starting (pretrained) values of the transferred ones,
    whose names make S; every other name of ``weights`` is in Sbar (new weights: plain L2)."""
    zero = next(iter(weights.values())).new_zeros((), dtype=torch.float32)
    pull = sum(((w.float() - start[k].float()).square().sum() for k, w in weights.items() if k in start), zero)
    decay = sum((w.float().square().sum() for k, w in weights.items() if k not in start), zero)
    return alpha / 2 * pull + beta / 2 * decay


class L2SPLoss(nn.Module):
    """``loss(pred, target) + Omega(w)``: any fine-tuning loss (:class:`medhybrid.engines.losses.FinetuneLoss`, the
    semi-supervised one) with :func:`l2sp_penalty` of ``network``'s trainable parameters added, ``start`` holding the
    starting values of the transferred ones (S). The parameters are read at each call, so the penalty follows the
    trained network wherever the engine put it (device, DistributedDataParallel: the same parameter objects). The
    last batch's terms (the wrapped loss's and ``l2sp``) are kept in :attr:`terms` for logging."""

    def __init__(self, loss: nn.Module, network: nn.Module, start: Mapping[str, torch.Tensor], alpha: float,
                 beta: float):
        super().__init__()
        self.loss, self.alpha, self.beta = loss, float(alpha), float(beta)
        self._weights = {k: p for k, p in network.named_parameters() if p.requires_grad}  # a dict: not registered
        self._start = {k: v.detach().clone() for k, v in start.items() if k in self._weights}
        self._last = 0.0

    @property
    def terms(self) -> dict[str, float]:
        return {**getattr(self.loss, "terms", {}), "l2sp": self._last}

    def forward(self, pred: torch.Tensor, target) -> torch.Tensor:
        for k, v in self._start.items():
            w = self._weights[k]
            if v.device != w.device:
                self._start[k] = v.to(w.device)
        omega = l2sp_penalty(self._weights, self._start, self.alpha, self.beta)
        self._last = float(omega.detach())
        return self.loss(pred, target) + omega


# --------------------------------------------------------------------------------------------- configuration
class RehearsalConfig(StrictModel):
    """Source rehearsal: a share of every fine-tuning batch drawn from the source's labelled images."""

    dataset: DatasetRef | None = Field(None, description="the source dataset whose labelled images are rehearsed (e.g. "
                                       "isic2018 when fine-tuning on ph2); None = off")
    splits: list[str] = Field(["train"], exclude_if=lambda v: v == ["train"],
                              description="the source's splits whose images (with their masks) are rehearsed")
    share: float = Field(0.25, gt=0, lt=1, exclude_if=lambda v: v == 0.25,
                         description="share of each batch drawn from the source (at least one row of each kind)")

    @model_validator(mode="after")
    def _source(self):
        if self.dataset is None:
            return self
        if self.dataset.role != "source" or not self.dataset.labelled:
            raise ValueError(f"rehearsal replays a source dataset's labelled images; {self.dataset.name!r} is a "
                             f"{'target' if self.dataset.role == 'target' else 'dataset without masks'}")
        held = sorted(set(self.splits) & set(HELD_OUT_SPLITS))
        if held or not self.splits:
            raise ValueError(f"rehearsal splits {self.splits}: name the source's training splits (e.g. [train]); "
                             "held-out test splits are never trained on")
        return self

    @property
    def enabled(self) -> bool:
        return self.dataset is not None


class RobustConfig(StrictModel):
    """Robust fine-tuning options (:mod:`medhybrid.engines.robust`), each off at its default; a field at its default is
    left out of the saved config (and so of the run's hash)."""

    l2sp_alpha: float = Field(0.0, ge=0, exclude_if=lambda v: v == 0,
                              description="L2-SP (Li, Grandvalet & Davoine, ICML 2018, eq. 4): weight alpha of the pull "
                              "alpha/2 ||w_S - w_S^0||^2 of the weights transferred from init towards their pretrained "
                              "values, added to the loss; 0 = off. Needs init")
    l2sp_beta: float = Field(0.0, ge=0, exclude_if=lambda v: v == 0,
                             description="L2-SP (Li et al. 2018, eq. 4): weight beta of the plain L2 penalty "
                             "beta/2 ||w_Sbar||^2 of the weights not transferred from init (a re-initialised output head; "
                             "every weight without init); 0 = off")
    trainable: list[str] | None = Field(None, exclude_if=lambda v: v is None,
                                        description="partial (surgical) fine-tuning (Lee et al., ICLR 2023): regular "
                                        "expressions (re.search) of the parameter names to train, or presets (decoder, "
                                        "norms-biases, decoder+norms, head: medhybrid.engines.robust.PRESETS); the other "
                                        "parameters are frozen (MONAI's freeze_layers). None = train every parameter")
    rehearsal: RehearsalConfig = Field(default_factory=RehearsalConfig, exclude_if=lambda v: v == RehearsalConfig(),
                                       description="source rehearsal (replay): a share of each fine-tuning batch drawn "
                                       "from the source's labelled images, with their masks, through the same "
                                       "preprocessing and augmentation; the mask loss covers both")

    @field_validator("trainable")
    @classmethod
    def _patterns(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("trainable is empty: that would freeze every parameter (None trains them all)")
        for p in trainable_patterns(v):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"trainable pattern {p!r} is not a regular expression ({e}); presets: "
                                 f"{', '.join(PRESETS)}") from None
        return v

    @property
    def l2sp(self) -> bool:
        return self.l2sp_alpha > 0 or self.l2sp_beta > 0

    @property
    def enabled(self) -> bool:
        return self.l2sp or self.trainable is not None or self.rehearsal.enabled

    def meta(self) -> dict:
        """What a fine-tuned ``model.pt`` records of these options: the ones not at their default (the rehearsal
        source by name)."""
        out = dump_config(self)
        if self.rehearsal.enabled:
            out["rehearsal"] = {**out["rehearsal"], "dataset": self.rehearsal.dataset.name,
                                "splits": list(self.rehearsal.splits), "share": self.rehearsal.share}
        return out


__all__ = ["BIASES", "DECODER", "freeze", "HEAD", "l2sp_penalty", "L2SPLoss", "NORMS", "PRESETS", "RehearsalConfig",
           "RobustConfig", "trainable_names", "trainable_patterns", "trainable_regex"]
