"""Segmentation and reconstruction metrics, in the forms MONAI's handlers and evaluators take."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ignite.distributed import all_reduce
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.utils import CommonKeys as Keys

from medhybrid.data.transforms import IGNORE_INDEX
from medhybrid.engines.batches import as_plain_tensor
from medhybrid.networks.nets import mask_classes


def logits_to_onehot(logits: torch.Tensor) -> torch.Tensor:
    """Binary (1 channel): foreground probability > 0.5, as one channel. Multi-class: one-hot argmax."""
    classes = mask_classes(logits)
    if logits.shape[1] == 1:
        return classes[:, None].float()
    return torch.nn.functional.one_hot(classes, logits.shape[1]).permute(0, 3, 1, 2).float()


def label_to_onehot(label: torch.Tensor, channels: int) -> torch.Tensor:
    lab = label.clamp(min=0).long()[:, 0]
    if channels == 1:
        return (lab > 0).float().unsqueeze(1)
    return torch.nn.functional.one_hot(lab, channels).permute(0, 3, 1, 2).float()


def masked_prediction(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, label) one-hot, with ignored pixels zeroed in both so metrics skip them."""
    label = as_plain_tensor(label)
    valid = (label != IGNORE_INDEX).float()
    pred = logits_to_onehot(as_plain_tensor(logits).float()) * valid
    return pred, label_to_onehot(label, logits.shape[1]) * valid


def dice_output_transform(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``output_transform`` for MONAI's ``MeanDice``/``MeanIoUHandler`` on a non-decollated evaluator."""
    return masked_prediction(output[Keys.PRED], output[Keys.LABEL])


class PerLevelMSE(Metric):
    """Mean squared error of the reconstruction at each corruption level, plus their mean
    (``name`` is the mean; ``name_<level>`` each level), on a non-decollated evaluator."""

    def __init__(self, levels: Sequence[float], image_channels: int,
                 output_transform=lambda o: (o[Keys.PRED], o[Keys.LABEL]), device="cpu"):
        self.levels, self.image_channels = list(levels), image_channels
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._sum = torch.zeros(len(self.levels), dtype=torch.float64)
        self._n = torch.zeros(len(self.levels), dtype=torch.float64)

    def update(self, output) -> None:
        pred, tgt = output
        err = (pred[:, : self.image_channels].float() - tgt["image"].float()).square().flatten(1).mean(1).double().cpu()
        idx = tgt["level_index"].cpu()
        self._sum.index_add_(0, idx, err)
        self._n.index_add_(0, idx, torch.ones_like(err))

    def compute(self) -> float:
        s, n = all_reduce(self._sum.clone()), all_reduce(self._n.clone())
        per = (s / n.clamp(min=1)).tolist()
        self.per_level = dict(zip(self.levels, per, strict=True))
        return float(sum(per) / len(per))

    def completed(self, engine: Engine, name: str) -> None:
        value = self.compute()
        engine.state.metrics[name] = value
        for lv, v in self.per_level.items():
            engine.state.metrics[f"{name}_{lv:g}"] = v


__all__ = ["dice_output_transform", "label_to_onehot", "logits_to_onehot", "masked_prediction", "PerLevelMSE"]
