"""MONAI inferers for the network's two output groups (image channels, then mask logits)."""

from __future__ import annotations

import torch
from monai.inferers import Inferer


class ConditionedInferer(Inferer):
    """Calls ``network(inputs, **conditioning)``: the full (image + mask) output."""

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        return network(inputs, *args, **kwargs)


class SegmentationInferer(Inferer):
    """Mask logits of the clean image at sigma_min: the channels after the first ``image_channels``."""

    def __init__(self, image_channels: int):
        super().__init__()
        self.image_channels = image_channels

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        return network(inputs)[:, self.image_channels :]
