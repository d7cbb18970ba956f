"""medhybrid.workflows.evaluate: native-resolution evaluation (the inference pipeline's masks), per-image metrics, CSV and overlays."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medhybrid.data.datasets import load_pairs
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.data.transforms import IGNORE_INDEX
from medhybrid.workflows.evaluate import binary_metrics, evaluate

pytestmark = pytest.mark.usefixtures("workdir")


# --------------------------------------------------------------------------------------------- metrics
def test_binary_metrics_known_masks():
    label = torch.zeros(8, 8)
    label[0:2, 0:2] = 1  # 4 pixels
    pred = torch.zeros(8, 8, dtype=torch.long)
    pred[0:2, 1:3] = 1  # 2 overlap, 2 extra
    m = binary_metrics(pred, label)
    assert m["dice"] == pytest.approx(0.5) and m["iou"] == pytest.approx(2 / 6)
    same = binary_metrics(label.long(), label)
    assert same == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}


def test_binary_metrics_ignored_pixels_excluded():
    label = torch.zeros(8, 8)
    label[0:2, 0:2] = 1
    label[4:8, :] = IGNORE_INDEX
    pred = torch.zeros(8, 8, dtype=torch.long)
    pred[0:2, 0:2] = 1
    pred[4:8, :] = 1  # all "wrong", but on ignored pixels
    assert binary_metrics(pred, label)["dice"] == 1.0 and binary_metrics(pred, label)["iou"] == 1.0


def test_binary_metrics_empty_cases():
    empty = torch.zeros(6, 6)
    m = binary_metrics(torch.zeros(6, 6, dtype=torch.long), empty)
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and math.isnan(m["hd95"])
    label = torch.zeros(6, 6)
    label[2, 2] = 1
    m = binary_metrics(torch.zeros(6, 6, dtype=torch.long), label)
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and math.isnan(m["hd95"])


def test_binary_metrics_multiclass_is_foreground():
    label = torch.tensor([[0.0, 1.0, 2.0, 2.0]])
    pred = torch.tensor([[0, 2, 1, 0]])  # classes confused but foreground found for 2 of 3
    m = binary_metrics(pred, label)
    assert m["dice"] == pytest.approx(2 * 2 / (2 + 3))


def test_binary_metrics_hd95_of_a_shift():
    label = torch.zeros(32, 32)
    label[8:24, 8:24] = 1
    pred = torch.zeros(32, 32, dtype=torch.long)
    pred[8:24, 11:27] = 1  # shifted 3 px
    assert binary_metrics(pred, label)["hd95"] == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------- evaluate
class _Stub(torch.nn.Module):
    """A 'network' whose mask logits are a fixed function of its input."""

    def __init__(self, fn):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.fn = fn
        self.mask_channels = 1

    def segment(self, x):
        return self.fn(x)


def _mask_stats(path) -> tuple[int, int]:
    m = np.asarray(Image.open(path))
    return int((m == 255).sum()), m.size


def test_evaluate_all_foreground_at_native_resolution(ph2_tiny, tmp_path):
    """A network that marks every pixel: Dice = 2|G| / (|G| + H W) of the original mask at its native size
    (the padding added for the 32 px model is not counted)."""
    spec = load_dataset_spec(ph2_tiny)
    pre = Preprocess(resolution=32, aspect="pad")
    res = evaluate(_Stub(lambda x: torch.full_like(x[:, :1], 5.0)), spec, pre, "test", out_dir=tmp_path / "ev",
                   batch_size=3, n_overlays=2)
    pairs = load_pairs(spec, "test")
    assert [r["id"] for r in res.rows] == [p["id"] for p in pairs]
    for r, p in zip(res.rows, pairs, strict=True):
        fg, n = _mask_stats(p["label"])
        assert r["dice"] == pytest.approx(2 * fg / (fg + n))
        assert r["iou"] == pytest.approx(fg / n)
    assert res.summary["test_images"] == 4.0
    assert res.summary["test_dice"] == pytest.approx(np.mean([r["dice"] for r in res.rows]))
    # a development set (pool images) is named as such: its scores are never reported as test scores
    dev = evaluate(_Stub(lambda x: torch.full_like(x[:, :1], 5.0)), spec, pre, "dev", pairs=load_pairs(spec, "pool")[:2])
    assert set(dev.summary) == {"dev_dice", "dev_iou", "dev_hd95", "dev_images"} and dev.summary["dev_images"] == 2.0

    with open(res.csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert res.csv == tmp_path / "ev" / "per_image.csv"
    assert [r["id"] for r in rows] == [p["id"] for p in pairs] and list(rows[0]) == ["id", "dice", "iou", "hd95"]
    assert [float(r["dice"]) for r in rows] == pytest.approx([r["dice"] for r in res.rows])

    assert sorted(p.name for p in res.overlays) == ["best_2.png", "worst_2.png"]
    for path in res.overlays:
        with Image.open(path) as im:  # one row of two 32 px tiles, 2 px padding, upscaled x2
            assert im.size == (2 * (2 * 34 + 2), 2 * 36)


def test_evaluate_all_background(ph2_tiny):
    spec = load_dataset_spec(ph2_tiny)
    res = evaluate(_Stub(lambda x: torch.full_like(x[:, :1], -5.0)), spec, Preprocess(resolution=32), "test")
    assert all(r["dice"] == 0.0 and math.isnan(r["hd95"]) for r in res.rows)
    assert res.csv is None and res.overlays == []
    assert math.isnan(res.summary["test_hd95"])


@pytest.mark.parametrize(("aspect", "floor"), [("pad", 0.93), ("stretch", 0.93), ("crop", 0.85)])
def test_evaluate_maps_predictions_back_to_the_right_place(ph2_tiny, aspect, floor):
    """Feed each mask as its own image to a 'network' that returns its input: the 32 px prediction, mapped back
    to the native 384x287 grid, must sit on the mask. A flip, transpose or offset in the geometry would not."""
    spec = load_dataset_spec(ph2_tiny)
    pairs = [{**p, "image": p["label"]} for p in load_pairs(spec, "test")]
    res = evaluate(_Stub(lambda x: x[:, :1] * 10), spec, Preprocess(resolution=32, aspect=aspect), pairs=pairs)
    assert len(res.rows) == 4
    assert min(r["dice"] for r in res.rows) > floor
    # the same prediction flipped left-right lands elsewhere
    flipped = evaluate(_Stub(lambda x: x[:, :1].flip(-1) * 10), spec, Preprocess(resolution=32, aspect=aspect), pairs=pairs)
    assert flipped.mean("dice") < res.mean("dice") - 0.05


def test_evaluate_empty_split(ph2_tiny):
    spec = load_dataset_spec(ph2_tiny)
    with pytest.raises(ValueError, match="has no 'val' images"):
        evaluate(_Stub(lambda x: x[:, :1]), spec, Preprocess(resolution=32), "val")


def test_an_unreadable_pair_is_named_and_the_others_are_scored(ph2_tiny, tmp_path, caplog):
    spec = load_dataset_spec(ph2_tiny)
    pairs = load_pairs(spec, "test")
    bad = tmp_path / "broken.png"
    bad.write_bytes(Path(pairs[0]["image"]).read_bytes()[:500])
    with caplog.at_level("ERROR", logger="medhybrid"):
        res = evaluate(_Stub(lambda x: torch.full_like(x[:, :1], 5.0)), spec, Preprocess(resolution=32), "test",
                       pairs=[{**pairs[0], "id": "broken", "image": str(bad)}, *pairs])
    assert len(res.rows) == len(pairs) and [Path(f).name for f, _ in res.failures] == ["broken.png"]
    assert sum("broken.png" in r.getMessage() for r in caplog.records) == 1
