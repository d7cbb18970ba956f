"""What a user runs: pretraining (:mod:`.pretrain`), fine-tuning (:mod:`.finetune`) and the few-shot run it
shares (:mod:`.fewshot`), inference (:mod:`.inference`) with its quality score (:mod:`.quality`), evaluation
(:mod:`.evaluate`), releases (:mod:`.release`), the MONAI bundles' helpers (:mod:`.bundle`) and diffusion sampling
(:mod:`.sampling`).

Layer 4: may import the layers below (``core``, ``data``, ``networks``, ``engines``).
"""


from medhybrid import lazy_modules

__getattr__ = lazy_modules(__name__)
