"""medhybrid.engines.metrics: segmentation and reconstruction metrics in the forms MONAI's handlers take."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from medhybrid.data.transforms import IGNORE_INDEX
from medhybrid.engines.metrics import PerLevelMSE, dice_output_transform, label_to_onehot, logits_to_onehot, masked_prediction
from medhybrid.networks import diffusion as D

EDM = D.EDMParams()


def test_per_level_mse():
    levels = [0.1, 1.0]
    metric = PerLevelMSE(levels, image_channels=1)
    metric.reset()
    img = torch.zeros(4, 1, 4, 4)
    # level 0.1: errors 0.5 (sq 0.25) and 1.0 (sq 1.0); level 1.0: error 2 (sq 4)
    pred = torch.cat([torch.full((1, 2, 4, 4), 0.5), torch.full((1, 2, 4, 4), 1.0), torch.full((2, 2, 4, 4), 2.0)])
    pred[:, 1] = 123.0  # the mask channel does not count
    metric.update((pred, {"image": img, "level_index": torch.tensor([0, 0, 1, 1])}))
    metric.update((torch.full((1, 2, 4, 4), 4.0), {"image": torch.zeros(1, 1, 4, 4), "level_index": torch.tensor([1])}))
    value = metric.compute()
    assert metric.per_level == {0.1: pytest.approx(0.625), 1.0: pytest.approx((4 + 4 + 16) / 3)}
    assert value == pytest.approx((0.625 + 8.0) / 2)
    engine = Engine(lambda e, b: None)
    metric.completed(engine, "val_recon_mse")
    assert engine.state.metrics == {"val_recon_mse": pytest.approx(4.3125), "val_recon_mse_0.1": pytest.approx(0.625),
                                    "val_recon_mse_1": pytest.approx(8.0)}


# --------------------------------------------------------------------------------------------- predictions and metrics
def test_masked_prediction_zeroes_ignored_pixels():
    logits = torch.tensor([[[[5.0, -5.0], [5.0, 5.0]]]])
    label = torch.tensor([[[[1.0, 1.0], [IGNORE_INDEX, 0.0]]]])
    pred, lab = masked_prediction(logits, label)
    assert pred.tolist() == [[[[1.0, 0.0], [0.0, 1.0]]]]
    assert lab.tolist() == [[[[1.0, 1.0], [0.0, 0.0]]]]


def test_masked_prediction_multiclass():
    logits = torch.zeros(1, 3, 1, 3)
    logits[0, 2, 0, 0] = logits[0, 1, 0, 1] = logits[0, 0, 0, 2] = 4.0
    label = torch.tensor([[[[2.0, 0.0, IGNORE_INDEX]]]])
    pred, lab = masked_prediction(logits, label)
    assert pred[0, :, 0].T.tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert lab[0, :, 0].T.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0]]
    assert torch.equal(logits_to_onehot(logits).sum(1), torch.ones(1, 1, 3))
    assert label_to_onehot(torch.tensor([[[[1.0, 0.0]]]]), 1).tolist() == [[[[1.0, 0.0]]]]


def test_dice_output_transform_with_monai_meandice():
    from monai.metrics import DiceMetric

    label = torch.zeros(1, 1, 4, 4)
    label[..., :2, :] = 1
    label[..., 3, :] = IGNORE_INDEX
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[..., :1, :] = 5.0  # half of the foreground found
    logits[..., 3, :] = 5.0  # "false positives" on ignored pixels do not count
    pred, lab = dice_output_transform({"pred": logits, "label": label})
    dice = DiceMetric(include_background=True)(pred, lab)
    assert dice.item() == pytest.approx(2 * 4 / (4 + 8))
