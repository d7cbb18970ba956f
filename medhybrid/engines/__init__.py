"""Training on MONAI's engines through their seams: :func:`.fit.fit` assembles a ``SupervisedTrainer``; the
prepare-batch seams (:mod:`.batches`), losses (:mod:`.losses`), metrics (:mod:`.metrics`), semi-supervised
algorithms, one registered class each (:mod:`.semi`) and the Ignite handlers (:mod:`.handlers`) plug into it.

Layer 3: may import ``medhybrid.core``, ``medhybrid.data`` and ``medhybrid.networks``.
"""


def __getattr__(name: str):
    """``medhybrid.engines.<module>`` imports the module on first use (bundle configs write ``$medhybrid.workflows.bundle.f(...)``
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
