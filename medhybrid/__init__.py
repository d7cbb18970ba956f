"""medhybrid: label-efficient 2D medical image segmentation with hybrid diffusion pretraining, on MONAI."""

import logging
import warnings

__version__ = "0.1.0"

# MONAI probes for a GPU DICOM decoder (nvImageCodec) on every LoadImage; without one it warns each
# time. medhybrid decodes DICOM with pydicom (see medhybrid.io), so the probe's warnings are noise.
import monai.data  # noqa: E402,F401  (the plugin's logger is configured on import; quiet it afterwards)

logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


def __getattr__(name: str):
    """``medhybrid.<module>`` imports the module on first use (bundle configs write ``$medhybrid.bundle.f(...)``
    after ``$import medhybrid``)."""
    import importlib

    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
