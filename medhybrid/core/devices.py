"""Which device a run uses: ``auto`` is the GPU (this process's own under data parallelism) when there is one, else
the CPU. Light on purpose: inference and the MONAI Label app import it without the training stack."""

from __future__ import annotations

import ignite.distributed as idist
import torch


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:1`` ... as a ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{idist.get_local_rank()}") if idist.get_world_size() > 1 else torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


__all__ = ["resolve_device"]
