"""medhybrid: label-efficient 2D medical image segmentation with hybrid diffusion pretraining, on MONAI."""

import importlib

__version__ = "0.2.0"


def __getattr__(name: str):
    """``medhybrid.<module>`` imports the module on first use (bundle configs write ``$medhybrid.workflows.bundle.f(...)``
    after ``$import medhybrid``). Importing medhybrid itself changes no global state (warning filters, loggers)."""
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
