"""One fine-tuning recipe: ``medhybrid finetune``, the ablation profiles, ``medhybrid adapt``'s fine-tunes and the
bundles' ``train.json`` all train with :data:`medhybrid.workflows.finetune.RECIPE`. This fails when one of them drifts."""

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from medhybrid.core.config import deep_merge, load_config, validate
from medhybrid.experiments.ablation import load_ablation
from medhybrid.workflows.finetune import RECIPE, AugmentConfig, FinetuneConfig, augmentation

BUNDLES = sorted((Path(__file__).resolve().parents[1] / "bundles").glob("*/configs/train.json"))


def _recipe_of(cfg: FinetuneConfig, labels: int) -> dict:
    s = cfg.schedule
    return {"lr": cfg.train.lr, "warmup_iterations": cfg.train.warmup_iterations, "batch_size": cfg.train.batch_size,
            "iterations": s.iterations(labels), "weight_decay": cfg.train.weight_decay, "grad_clip": cfg.train.grad_clip}


WANT = {n: {"lr": RECIPE.lr, "warmup_iterations": RECIPE.warmup_iterations, "batch_size": RECIPE.batch_size,
            "iterations": max(RECIPE.min_iterations, min(RECIPE.max_iterations, RECIPE.per_label * n)),
            "weight_decay": 0.0, "grad_clip": 1.0} for n in (1, 5, 10, 30)}


@pytest.mark.parametrize("labels", [1, 5, 10, 30])
def test_finetune_command_and_its_shipped_configs_use_the_recipe(ph2_tiny, labels):
    assert _recipe_of(FinetuneConfig(dataset=str(ph2_tiny)), labels) == WANT[labels]
    for name in ("ph2", "openist"):
        cfg = load_config(FinetuneConfig, name, [], kind="finetune")
        assert _recipe_of(cfg, labels) == WANT[labels], name
    # a partial train section keeps the recipe's other fields, not TrainConfig's pretraining defaults
    partial = FinetuneConfig(dataset=str(ph2_tiny), train={"check_data": False})
    assert _recipe_of(partial, labels) == WANT[labels]


@pytest.mark.parametrize("domain", ["dermoscopy", "chest_xray"])
@pytest.mark.parametrize("profile", ["quick", "standard", "compare", "semi"])
def test_ablation_profiles_fine_tune_with_the_recipe(domain, profile, ph2_tiny):
    """Every CPU profile (the ``full`` profile is the GPU recipe: larger network, longer schedule)."""
    cfg = load_ablation(domain, profile, [])
    ft = validate(FinetuneConfig, deep_merge(cfg.finetune, {"dataset": str(ph2_tiny)}))
    assert _recipe_of(ft, 5) == WANT[5] and _recipe_of(ft, 30) == WANT[30]


@pytest.mark.parametrize("train_json", BUNDLES, ids=lambda p: p.parts[-3])
def test_bundles_train_json_trains_with_the_recipe(train_json):
    parser = ConfigParser()
    parser.read_config(str(train_json))
    parser["bundle_root"] = str(train_json.parents[1])
    got = {k: parser.get_parsed_content(k) for k in ("learning_rate", "per_label", "min_iterations", "max_iterations")}
    assert got == {"learning_rate": RECIPE.lr, "per_label": RECIPE.per_label, "min_iterations": RECIPE.min_iterations,
                   "max_iterations": RECIPE.max_iterations}
    raw = parser.config
    assert "RECIPE" in raw["batch_size"] and raw["train"]["lr_scheduler"]["warmup_steps"].endswith("RECIPE.warmup_iterations")
    assert raw["optimizer"]["weight_decay"] == 0.0
    # the iterations are split into the recipe's epochs (MONAI Label's max_epochs splits the same iterations otherwise)
    assert parser.get_parsed_content("train#trainer#max_epochs") == RECIPE.epochs
    clip = next(h for h in raw["train"]["handlers"] if h.get("_target_", "").endswith("GradientClipping"))
    assert clip["max_norm"] == 1.0


@pytest.mark.parametrize("train_json", BUNDLES, ids=lambda p: p.parts[-3])
def test_bundles_train_json_augments_as_the_recipe(train_json):
    """``train.json``'s random transforms and the recipe's augmentation (:class:`AugmentConfig`'s defaults) give the same
    images and masks from the same random state: the same transforms, in the same order, with the same ranges."""
    import torch
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(train_json))
    parser["bundle_root"] = str(train_json.parents[1])
    theirs = Compose(parser.get_parsed_content("train#random_transforms"))
    ours = augmentation(AugmentConfig())
    assert [type(t).__name__ for t in theirs.transforms] == [type(t).__name__ for t in ours.transforms]
    g = torch.Generator().manual_seed(0)
    channels = parser.get_parsed_content("image_channels")
    for seed in range(8):
        item = {"image": torch.rand(channels, 32, 32, generator=g) * 2 - 1,
                "label": (torch.rand(1, 32, 32, generator=g) > 0.5).float()}
        a = ours.set_random_state(seed)({k: v.clone() for k, v in item.items()})
        b = theirs.set_random_state(seed)({k: v.clone() for k, v in item.items()})
        for k in item:
            assert torch.allclose(torch.as_tensor(a[k]), torch.as_tensor(b[k]), atol=1e-5), (seed, k)
