"""The research harness: the label-budget ablation (:mod:`.ablation`) with its fine-tuning heads, one
registered class each (:mod:`.heads`), its report (:mod:`.report`) and statistics (:mod:`.stats`), active learning
(:mod:`.active`), DDPM pixel features (:mod:`.pixel_features`) and nnU-Net v2 beside medhybrid (:mod:`.nnunet`).

Layer 5: may import every library layer (``core`` to ``workflows``); nothing of the library imports it, and neither
does ``medhybrid.label``.
"""


def __getattr__(name: str):
    """``medhybrid.experiments.<module>`` imports the module on first use (bundle configs write ``$medhybrid.workflows.bundle.f(...)``
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
