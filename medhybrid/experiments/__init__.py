"""The research harness: the label-budget ablation (:mod:`.ablation`) with its fine-tuning heads, one
registered class each (:mod:`.heads`), its report (:mod:`.report`) and statistics (:mod:`.stats`), active learning
(:mod:`.active`), DDPM pixel features (:mod:`.pixel_features`) and nnU-Net v2 beside medhybrid (:mod:`.nnunet`, in its own
process: :mod:`.nnunet_child`).

Layer 5: may import every library layer (``core`` to ``workflows``); nothing of the library imports it, and neither
does ``medhybrid.label``.
"""


from medhybrid import lazy_modules

__getattr__ = lazy_modules(__name__)
