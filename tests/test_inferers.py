"""medhybrid.networks.inferers: the inferers read the right output channels."""

from __future__ import annotations

import torch
from monai.inferers import SimpleInferer

from medhybrid.networks import diffusion as D
from medhybrid.networks.inferers import SegmentationInferer

EDM = D.EDMParams()


def test_inferers():
    class Net(torch.nn.Module):
        def forward(self, x, sigma=None, precondition=True):
            return torch.cat([x * (2 if precondition else 3), torch.full_like(x[:, :1], float(sigma or 0))], 1)

    x = torch.ones(2, 3, 4, 4)
    out = SimpleInferer()(x, Net(), sigma=0.5, precondition=False)
    assert out.shape == (2, 4, 4, 4) and out[:, :3].eq(3).all() and out[:, 3].eq(0.5).all()
    seg = SegmentationInferer(3)(x, Net())
    assert seg.shape == (2, 1, 4, 4) and seg.eq(0).all()
