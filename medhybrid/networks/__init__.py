"""The model: EDM's math (:mod:`.diffusion`), the noise-level-conditioned U-Net with its preconditioning
(:mod:`.nets`), the pretraining modes, one registered class each (:mod:`.modes`), MONAI inferers that read the right
output channels (:mod:`.inferers`), and model files with name-and-shape weight transfer (:mod:`.checkpoints`).

Layer 2: may import ``medhybrid.core`` and ``medhybrid.data``.
"""


def __getattr__(name: str):
    """``medhybrid.networks.<module>`` imports the module on first use (bundle configs write ``$medhybrid.workflows.bundle.f(...)``
    after ``$import medhybrid``); importing the package itself loads nothing else."""
    import importlib

    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
