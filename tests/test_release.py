"""medhybrid.workflows.release: a bundle's pretrained and fine-tuned weights interpolated (WiSE-FT) into its own network."""

from __future__ import annotations

import torch
from conftest import REPO_ROOT

from medhybrid.networks.checkpoints import interpolate_weights
from medhybrid.workflows.inference import bundle_segmenter

DERM = REPO_ROOT / "bundles" / "dermoscopy_lesion_segmentation"


def test_the_bundles_weights_interpolate_into_their_network():
    """alpha 0 and 1 load back the pretrained and the released weights exactly, into the bundle's own network."""
    net, _ = bundle_segmenter(DERM)
    pre = torch.load(DERM / "models" / "pretrained.pt", weights_only=True)
    ft = torch.load(DERM / "models" / "model.pt", weights_only=True)
    for alpha, want in ((0.0, pre), (1.0, ft)):
        net.load_state_dict(interpolate_weights(pre, ft, alpha), strict=True)
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
