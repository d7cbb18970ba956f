"""Wall time of a label-budget ablation: ``medhybrid ablate`` (MONAI engines, validation, previews,
checkpoints, MLflow, data checks, the report) side by side with a plain PyTorch script doing the same
training and test evaluation, in one run.

    .venv/bin/python benchmarks/ablation_time.py --config dermoscopy --profile quick [--method hybrid ...] [KEY=VALUE ...]

Both sides resolve the same ablation config (profile + overrides) and so train the same networks, on the
same decoded images, for the same iterations with the same batches sizes, corruption, loss, optimiser,
LR schedule, gradient clipping and augmentation, then score the target's test split with the same
evaluation loop (``medhybrid.workflows.evaluate.evaluate``, which has no engine).
The plain script leaves out what the tool adds: the per-epoch validation and preview of pretraining,
checkpoints, MLflow runs, the data checks, the per-image CSV and overlays, and the report. Methods with
the ``ddpm-features`` head and semi-supervised methods are left out of both sides (their MLP ensemble and their
mixed batches have no plain counterpart here; ``benchmarks/semi_cost.py`` prices the latter).

Each side runs in its own subprocess in a fresh temporary folder (MLflow in a SQLite store there). Prints
seconds per method and stage, mean test Dice per method (a check that both did the same work), and the
ratio medhybrid/plain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain_throughput import plain_step  # noqa: E402

STAGES = ("pretrain_s", "train_s", "eval_s")


def _config(args, out: Path):
    from medhybrid.experiments.ablation import load_ablation

    cfg = load_ablation(args.config, args.profile, [*args.overrides, f"output_dir={out / 'ablation'}",
                                                    f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}"])
    unknown = set(args.method or []) - set(cfg.methods)
    if unknown:
        sys.exit(f"no method {sorted(unknown)} in {args.config} (methods: {sorted(cfg.methods)})")
    keep = [m for m in (args.method or cfg.methods)
            if cfg.methods[m].head == "finetune" and not cfg.methods[m].semi_supervised]
    # a kept method may reuse the pretraining of a left-out one: keep the order, drop the others
    return cfg.model_copy(update={"methods": {m: cfg.methods[m] for m in cfg.methods if m in keep}})


def medhybrid_side(cfg) -> dict:
    from medhybrid.core import runs
    from medhybrid.experiments.ablation import run_ablation

    t = time.perf_counter()
    out = run_ablation(cfg)
    wall = time.perf_counter() - t
    if out["failures"]:
        raise RuntimeError(f"ablation failures: {out['failures']}")
    timings = json.loads((cfg.folder / "timings.json").read_text())["invocations"][-1]
    dice: dict[str, list[float]] = {}
    for method in cfg.methods:
        for state in (cfg.folder / "finetune" / method).glob("*/state.json"):
            dice.setdefault(method, []).append(runs.scores(json.loads(state.read_text()))[1]["test_dice"])
    return {"wall_s": wall, "stages": timings["methods"], "dice": dice}


def _plain_train(net, images, labels, prepare, loss_fn, train, iterations: int, batch: int, device, augment=None):
    """The bare loop: random batches (with replacement), corruption, forward, loss, backward, clip, step."""
    import torch
    from monai.optimizers import WarmupCosineSchedule

    amp = device.type == "cuda" and train.amp
    net = net.to(device)
    if amp:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = WarmupCosineSchedule(opt, warmup_steps=min(train.warmup_iterations, iterations - 1), t_total=iterations,
                                 warmup_multiplier=0.01)
    g = torch.Generator().manual_seed(train.seed)
    net.train()
    for it in range(iterations):
        idx = torch.randint(len(images), (batch,), generator=g)
        if augment is None:
            b = {"image": images[idx], "label": labels[idx]}
        else:
            items = [augment({"image": images[i], "label": labels[i]}) for i in idx.tolist()]
            b = {k: torch.stack([torch.as_tensor(d[k]).as_subclass(torch.Tensor) for d in items]) for k in ("image", "label")}
        plain_step(net, net, opt, prepare, loss_fn, b, it + 1, device, amp, train.grad_clip)
        sched.step()
    return net


def _decode(pairs, transform):
    import torch

    items = [transform(p) for p in pairs]
    return tuple(torch.stack([torch.as_tensor(d[k]).as_subclass(torch.Tensor) for d in items]) for k in ("image", "label"))


def plain_side(cfg, out: Path) -> dict:
    import torch

    from medhybrid.core.devices import resolve_device
    from medhybrid.data.datasets import few_shot_pairs, load_pairs
    from medhybrid.data.transforms import preprocessing
    from medhybrid.engines.batches import SegmentationPrepareBatch
    from medhybrid.engines.losses import FinetuneLoss, PretrainLoss
    from medhybrid.experiments.ablation import finetune_config, pretrain_config, pretraining_of
    from medhybrid.networks.checkpoints import network_meta, save_model
    from medhybrid.networks.nets import build_network
    from medhybrid.workflows.evaluate import evaluate
    from medhybrid.workflows.finetune import augmentation, initial_network
    from medhybrid.workflows.pretrain import corruption

    t_all = time.perf_counter()
    stages: dict[str, dict[str, float]] = {}
    dice: dict[str, list[float]] = {}
    source: dict[str, tuple] = {}
    inits: dict[str, Path] = {}
    for method in cfg.methods:
        clock = stages.setdefault(method, dict.fromkeys(STAGES, 0.0))
        t = time.perf_counter()
        key = pretraining_of(cfg, method)
        if key not in inits:  # methods sharing a pretraining train it once, as the ablation does
            pcfg = pretrain_config(cfg, method)
            device = resolve_device(pcfg.train.device)
            torch.manual_seed(pcfg.train.seed)
            net = build_network(pcfg.model, pcfg.dataset.channels, pcfg.dataset.mask.num_classes)
            if pcfg.mode != "none":
                data_key = json.dumps([pcfg.dataset.model_dump(mode="json"), pcfg.preprocess.model_dump(mode="json")])
                if data_key not in source:  # decoded once, like the ablation's source cache
                    source.clear()
                    source[data_key] = _decode(load_pairs(pcfg.dataset, "train"), preprocessing(pcfg.dataset, pcfg.preprocess))
                loss = PretrainLoss(pcfg.mode, net.mask_channels, pcfg.model.edm.sigma_data)
                net = _plain_train(net, *source[data_key], corruption(pcfg), loss, pcfg.train, pcfg.train.iterations,
                                   pcfg.train.batch_size, device)
            inits[key] = save_model(net.cpu(), network_meta(net, pcfg.model, pcfg.preprocess, pcfg.dataset, pcfg.mode),
                                    out / "plain" / key / "model.pt")
        clock["pretrain_s"] += time.perf_counter() - t
        for budget in cfg.budgets:
            for seed in cfg.seeds:
                t = time.perf_counter()
                fcfg = finetune_config(cfg, method, inits[key], budget, seed, None, None)
                device = resolve_device(fcfg.train.device)
                pairs = few_shot_pairs(fcfg.dataset, fcfg.budget, fcfg.seed)
                images, labels = _decode(pairs, preprocessing(fcfg.dataset, fcfg.preprocess))
                net, _ = initial_network(fcfg)
                aug = augmentation(fcfg.augment)
                if aug is not None:
                    aug.set_random_state(seed=seed)
                train = fcfg.train.model_copy(update={"seed": seed})
                net = _plain_train(net, images, labels, SegmentationPrepareBatch(),
                                   FinetuneLoss(net.image_channels, net.mask_channels), train, fcfg.schedule.iterations(len(pairs)),
                                   min(train.batch_size, max(2, len(pairs))), device, augment=aug)
                clock["train_s"] += time.perf_counter() - t
                t = time.perf_counter()
                # medhybrid's evaluation is already a plain loop (no engine): the plain side only skips its CSV and overlays
                dice.setdefault(method, []).append(evaluate(net, fcfg.dataset, fcfg.preprocess, "test").mean("dice"))
                clock["eval_s"] += time.perf_counter() - t
    return {"wall_s": time.perf_counter() - t_all, "stages": stages, "dice": dice}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="dermoscopy", help="ablation YAML or shipped name")
    p.add_argument("--profile", default="quick")
    p.add_argument("--method", action="append", help="only these methods (repeatable; default: every fine-tuned method)")
    p.add_argument("--side", choices=["medhybrid", "plain"], help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ablation config overrides")
    args = p.parse_args()
    if args.side:
        with tempfile.TemporaryDirectory(prefix=f"ablation-{args.side}-") as tmp:
            cfg = _config(args, Path(tmp))
            res = medhybrid_side(cfg) if args.side == "medhybrid" else plain_side(cfg, Path(tmp))
        print("RESULT " + json.dumps(res))
        return

    import torch

    res = {}
    for side in ("plain", "medhybrid"):
        cmd = [sys.executable, __file__, "--side", side, "--config", args.config, "--profile", args.profile,
               *[f"--method={m}" for m in args.method or []], *args.overrides]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{side} side failed:\n{run.stderr[-4000:]}")
        res[side] = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))[7:])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args, Path(tmp))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    runs = len(cfg.budgets) * len(cfg.seeds)
    print(f"ablation {cfg.name}: {len(cfg.methods)} methods x {len(cfg.budgets)} budgets x {len(cfg.seeds)} seeds "
          f"({runs} fine-tunes per method) on {device}, torch {torch.__version__}")
    print(f"{'method':14s} {'side':10s} " + " ".join(f"{s:>11s}" for s in STAGES) + f" {'test dice':>10s}")
    for method in cfg.methods:
        for side in ("plain", "medhybrid"):
            st, d = res[side]["stages"].get(method, {}), res[side]["dice"].get(method, [])
            dice = f"{sum(d) / len(d):10.3f}" if d else f"{'-':>10s}"
            print(f"{method:14s} {side:10s} " + " ".join(f"{st.get(s, 0.0):11.1f}" for s in STAGES) + f" {dice}")
    pl, mh = res["plain"], res["medhybrid"]

    def total(side: dict, stage: str) -> float:
        return sum(m.get(stage, 0.0) for m in side["stages"].values())

    print(f"wall time: plain {pl['wall_s']:.1f} s, medhybrid {mh['wall_s']:.1f} s")
    parts = ", ".join(f"{s[:-2]} {total(mh, s) / max(total(pl, s), 1e-9):.3f}" for s in STAGES)
    print(f"ratio medhybrid/plain: wall {mh['wall_s'] / pl['wall_s']:.3f} ({parts})")


if __name__ == "__main__":
    main()
