"""The ground floor: typed configuration (:mod:`.config`), files written atomically (:mod:`.files`), a run's folder
and lifecycle (:mod:`.runs`), MLflow tracking with its outbox (:mod:`.tracking`) and the CPU thread policy
(:mod:`.threads`).

Layer 0: imports nothing of medhybrid outside ``medhybrid.core``.
"""


from medhybrid import lazy_modules

__getattr__ = lazy_modules(__name__)
