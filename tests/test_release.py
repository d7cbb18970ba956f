"""medhybrid.release: WiSE-FT interpolation of a bundle's pretrained and fine-tuned weights."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO_ROOT

from medhybrid.inference import bundle_segmenter
from medhybrid.release import interpolate_weights

DERM = REPO_ROOT / "bundles" / "dermoscopy_lesion_segmentation"


def test_interpolation_is_eq_1_of_wise_ft():
    a = {"w": torch.zeros(2, 2), "steps": torch.tensor(3)}
    b = {"w": torch.ones(2, 2) * 4, "steps": torch.tensor(7)}
    assert torch.equal(interpolate_weights(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_weights(a, b, 1.0)["w"], b["w"])
    mid = interpolate_weights(a, b, 0.25)
    assert torch.allclose(mid["w"], torch.ones(2, 2)) and mid["steps"].item() == 7  # integer buffers: the fine-tuned
    with pytest.raises(ValueError, match="differ in 1 tensor"):
        interpolate_weights(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_weights(a, {"w": torch.ones(3), "steps": b["steps"]}, 0.5)


def test_the_bundles_weights_interpolate_into_their_network():
    """alpha 0 and 1 load back the pretrained and the released weights exactly, into the bundle's own network."""
    net, _ = bundle_segmenter(DERM)
    pre = torch.load(DERM / "models" / "pretrained.pt", weights_only=True)
    ft = torch.load(DERM / "models" / "model.pt", weights_only=True)
    for alpha, want in ((0.0, pre), (1.0, ft)):
        net.load_state_dict(interpolate_weights(pre, ft, alpha), strict=True)
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
