"""The inferer of the network's mask output (MONAI's ``SimpleInferer`` serves the full output: image, then mask)."""

from __future__ import annotations

import torch
from monai.inferers import SimpleInferer

__all__ = ["SegmentationInferer"]


class SegmentationInferer(SimpleInferer):
    """Mask logits of the clean image at sigma_min: the channels after the first ``image_channels``."""

    def __init__(self, image_channels: int):
        super().__init__()
        self.image_channels = image_channels

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        return network(inputs)[:, self.image_channels :]
