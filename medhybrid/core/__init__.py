"""The ground floor: typed configuration (:mod:`.config`), files written atomically (:mod:`.files`), a run's folder
and lifecycle (:mod:`.runs`), MLflow tracking with its outbox (:mod:`.tracking`) and the CPU thread policy
(:mod:`.threads`).

Layer 0: imports nothing of medhybrid outside ``medhybrid.core``.
"""


def __getattr__(name: str):
    """``medhybrid.core.<module>`` imports the module on first use (bundle configs write ``$medhybrid.workflows.bundle.f(...)``
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
