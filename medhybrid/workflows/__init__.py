"""What a user runs: pretraining (:mod:`.pretrain`), fine-tuning (:mod:`.finetune`) and the few-shot run it
shares (:mod:`.fewshot`), inference (:mod:`.inference`) with its quality score (:mod:`.quality`), evaluation
(:mod:`.evaluate`), releases (:mod:`.release`), the MONAI bundles' helpers (:mod:`.bundle`) and diffusion sampling
(:mod:`.sampling`).

Layer 4: may import the layers below (``core``, ``data``, ``networks``, ``engines``).
"""


def __getattr__(name: str):
    """``medhybrid.workflows.<module>`` imports the module on first use (bundle configs write ``$medhybrid.workflows.bundle.f(...)``
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
