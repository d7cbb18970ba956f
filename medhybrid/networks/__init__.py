"""The model: EDM's math (:mod:`.diffusion`), the noise-level-conditioned U-Net with its preconditioning
(:mod:`.nets`), the pretraining modes, one registered class each (:mod:`.modes`), MONAI inferers that read the right
output channels (:mod:`.inferers`), and model files with name-and-shape weight transfer (:mod:`.checkpoints`).

Layer 2: may import ``medhybrid.core`` and ``medhybrid.data``.
"""


from medhybrid import lazy_modules

__getattr__ = lazy_modules(__name__)
