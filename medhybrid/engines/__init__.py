"""Training on MONAI's engines through their seams: :func:`.fit.fit` assembles a ``SupervisedTrainer``; the
prepare-batch seams (:mod:`.batches`), losses (:mod:`.losses`), metrics (:mod:`.metrics`), semi-supervised
algorithms, one registered class each (:mod:`.semi`) and the Ignite handlers (:mod:`.handlers`) plug into it.

Layer 3: may import ``medhybrid.core``, ``medhybrid.data`` and ``medhybrid.networks``.
"""


from medhybrid import lazy_modules

__getattr__ = lazy_modules(__name__)
