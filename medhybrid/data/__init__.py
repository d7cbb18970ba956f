"""Images and datasets: readers for PNG/JPEG/BMP/TIFF, DICOM, NIfTI and MHA/NRRD (:mod:`.io`), dataset specs
and preprocessing settings (:mod:`.specs`), discovery, splits and few-shot subsets (:mod:`.datasets`), MONAI
transforms in array and dict forms (:mod:`.transforms`), ``medhybrid data check`` (:mod:`.check`), image-only sources
(:mod:`.unlabelled`), DICOM SEG writing (:mod:`.dicom_seg`) and overlays (:mod:`.visualize`).

Layer 1: may import ``medhybrid.core``.
"""


def __getattr__(name: str):
    """``medhybrid.data.<module>`` imports the module on first use (bundle configs write ``$medhybrid.workflows.bundle.f(...)``
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
