"""medhybrid: label-efficient 2D medical image segmentation with hybrid diffusion pretraining, on MONAI."""

import importlib

__version__ = "0.2.3"


def lazy_modules(package: str):
    """A module ``__getattr__`` for ``package``: ``package.<module>`` imports the module on first use (bundle configs
    write ``$medhybrid.workflows.bundle.f(...)`` after ``$import medhybrid``), so importing a package loads nothing
    else and changes no global state (warning filters, loggers)."""

    def __getattr__(name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{package}.{name}":
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            raise

    return __getattr__


__getattr__ = lazy_modules(__name__)
