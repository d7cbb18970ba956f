"""medhybrid.workflows.quality: the uncertainty score (mask disagreement across noise levels) and the quality CSV of an
inference run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PH2, real_split
from conftest import TINY_UNET as TINY
from PIL import Image

from medhybrid.networks.nets import EDMPrecond, build_network
from medhybrid.workflows.inference import Segmenter, infer_files, score_files
from medhybrid.workflows.quality import (
    QualityInferer,
    UncertaintyConfig,
    image_scores,
    mask_dice,
    mask_disagreement,
    rank_correlation,
    score_images,
)

pytestmark = pytest.mark.usefixtures("workdir")


class _Fixed(EDMPrecond):
    """A stand-in network whose mask is ``x[:, 0] > threshold(sigma)``: noise-free masks agree with themselves."""

    def __init__(self, react: float):
        super().__init__(torch.nn.Conv2d(1, 1, 1), image_channels=1, mask_channels=1)
        self.react = react

    def forward(self, x, sigma=None, precondition=True):
        s = self._sigma(x, sigma).view(-1, 1, 1)
        return torch.cat([x, (x[:, :1] - self.react * s[:, None]) * 10], dim=1)


def test_mask_dice_per_image_and_empty_masks_agree():
    a = torch.zeros(3, 4, 4, dtype=torch.long)
    b = a.clone()
    a[0, :2] = 1
    b[0, :1] = 1  # 4 of 8 and 4 px: Dice 2*4/12
    a[1, :2] = 1  # image 1: prediction vs nothing -> 0
    d = mask_dice(a, b, 2)
    assert d.tolist() == pytest.approx([8 / 12, 0.0, 1.0])
    c = torch.tensor([[[1, 2], [2, 0]]])
    assert mask_dice(c, c, 3).item() == 1.0 and mask_dice(c, torch.zeros_like(c), 3).item() == 0.0


def test_disagreement_is_zero_for_a_noise_blind_mask_and_grows_with_sensitivity():
    x = torch.linspace(-1, 1, 32 * 32).reshape(1, 1, 32, 32).repeat(2, 1, 1, 1)  # half of each image is "lesion"
    x[1] = x[1] * 0.5  # flatter intensities: the same noise moves more of its boundary
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    blind = mask_disagreement(_Fixed(0.0), x, (1e-6,), 2, g())
    assert blind.tolist() == pytest.approx([0.0, 0.0], abs=1e-3)
    low = mask_disagreement(_Fixed(0.0), x, (0.1,), 4, g())
    high = mask_disagreement(_Fixed(3.0), x, (0.1,), 4, g())  # the mask also shifts with sigma
    assert (high > low).all() and (low > 0).all() and (high <= 1).all()
    assert low[1] > low[0]  # a fuzzier boundary is a less certain mask


def test_scores_are_seeded_and_work_for_a_segmenter(ph2_pair):
    torch.manual_seed(0)
    net = build_network(TINY, 3, 2).eval()
    imgs = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(5)]
    cfg = UncertaintyConfig(batch_size=2)
    s1, s2 = score_images(net, imgs, cfg), score_images(net, imgs, cfg)
    assert s1 == s2 and len(s1) == 5 and all(0 <= s <= 1 for s in s1)
    seg = Segmenter.wrap(net)
    assert score_images(seg, imgs, cfg) == s1  # the served Segmenter scores the same
    meta = {"image_channels": 3, "preprocess": {"resolution": 32, "aspect": "pad"}}
    assert len(score_files(seg, meta, [ph2_pair[0]] * 2)) == 2
    with pytest.raises(ValueError, match="positive"):
        UncertaintyConfig(sigmas=(0.0, 0.1))


def test_an_image_scores_the_same_alone_or_in_a_batch():
    torch.manual_seed(0)
    net = build_network(TINY, 3, 2).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    together = image_scores(net, x)
    assert image_scores(net, x[2:]) == pytest.approx(together[2:], abs=1e-6)
    assert image_scores(net, x.flip(0)) == pytest.approx(together[::-1], abs=1e-6)
    alone = [float(mask_disagreement(net, x[i : i + 1], generator=torch.Generator().manual_seed(0))[0]) for i in range(3)]
    assert together == pytest.approx(alone, abs=1e-6)



def test_the_inferer_scores_on_the_masks_own_pass():
    """QualityInferer returns what SimpleInferer returns (the served logits, MONAI metadata kept for Invertd) and the same
    u as image_scores, with the network run 1 + 3 times per image (QUALITY_SCORE: 3 noise levels, 1 draw), not 1 + 4."""
    from monai.data import MetaTensor
    from monai.inferers import SimpleInferer

    torch.manual_seed(0)
    seg = Segmenter.wrap(build_network(TINY, 3, 2)).eval()
    x = MetaTensor(torch.rand(2, 3, 32, 32) * 2 - 1, meta={"filename_or_obj": ["a.png", "b.png"]})
    images = []
    seg.backbone.register_forward_hook(lambda m, args, out: images.append(args[0].shape[0]))
    inferer = QualityInferer()
    with torch.no_grad():
        logits = inferer(x, seg)
        assert sum(images) == 2 * (1 + 3)
        assert isinstance(logits, MetaTensor) and torch.equal(logits.as_tensor(), SimpleInferer()(x, seg).as_tensor())
    assert inferer.scores == pytest.approx(image_scores(seg, x.as_tensor(), inferer.cfg), abs=1e-9)
    assert len(inferer.scores) == 2 and all(0 <= u <= 1 for u in inferer.scores)

def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation([1, 2], [1, 2]))


def test_quality_csv_lists_every_image_least_certain_first(tmp_path):
    """The dermoscopy bundle on 6 real PH2 test images: one row per image with its mask's area fraction (as in the
    PNG) and u, sorted by u, largest first."""
    ids = real_split(PH2)["test"][:6]
    res = infer_files(Path(__file__).resolve().parents[1] / "bundles" / "dermoscopy_lesion_segmentation",
                      [PH2 / "images" / f"{i}.png" for i in ids], tmp_path / "out", batch_size=4)
    rows = list(csv.DictReader(open(res.quality_csv)))
    assert sorted(Path(r["image"]).stem for r in rows) == sorted(ids)
    u = [float(r["uncertainty"]) for r in rows]
    assert u == sorted(u, reverse=True) and all(0 <= v <= 1 for v in u) and len(set(u)) > 1
    for r in rows:
        mask = np.asarray(Image.open(r["mask"])) > 0
        assert float(r["area_fraction"]) == pytest.approx(mask.mean(), abs=1e-4) and r["status"] == "ok"
