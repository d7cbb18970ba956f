"""Images and datasets: readers for PNG/JPEG/BMP/TIFF, DICOM, NIfTI and MHA/NRRD (:mod:`.io`), dataset specs
and preprocessing settings (:mod:`.specs`), discovery, splits and few-shot subsets (:mod:`.datasets`), MONAI
transforms in array and dict forms (:mod:`.transforms`), ``medhybrid data check`` (:mod:`.check`), image-only sources
(:mod:`.unlabelled`), DICOM SEG writing (:mod:`.dicom_seg`) and overlays (:mod:`.visualize`).

Layer 1: may import ``medhybrid.core``.
"""


from medhybrid import lazy_modules

__getattr__ = lazy_modules(__name__)
