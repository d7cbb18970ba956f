"""With two labels, what the labels say about the start: for each two-label development subset of a `standard`
pretraining (the hybrid; on PH2 also the supervised one), the held-out rule's decision (the k2-dev runs'
`<pretraining>-adapt`), the share of the start's wrong pixels on both labels that it is sure of
(medhybrid.workflows.adapt.start_confident_errors), and the development Dice of keeping the start, of plain
fine-tuning, of the held-out rule alone and of the rule with the labels' check (medhybrid.workflows.adapt.labels_check,
rule.label_check_up_to = 2). Forward passes only; OpenIST's shares need no run (its subsets are the pool ids drawn with
the same seeds).

    .venv/bin/python docs/results/k2-dev/labels_check.py > docs/results/k2-dev/labels_check.md

Needs the PH2 k2-dev runs (runs/ablation/dermoscopy-k2-dev, see README.md)."""

import csv
import json
from pathlib import Path

import numpy as np

from medhybrid.data.datasets import few_shot_ids, load_pairs
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.networks.checkpoints import load_model
from medhybrid.workflows.adapt import AdaptRule, Decision, labels_check, start_confident_errors

ROWS = {"keep": "keep", "plain": "plain", "alone": "held-out rule alone", "checked": "with the labels' check"}
rule = AdaptRule()
print("| target, pretraining | subset | labels | sure share of the start's errors | held-out rule | keep | plain | "
      "held-out rule alone | with the labels' check |")
print("|---" * 9 + "|")
totals = {}
for domain, name, start in [("dermoscopy", "ph2", "hybrid"), ("dermoscopy", "ph2", "supervised"),
                            ("chest_xray", "openist", "hybrid")]:
    root = Path(f"runs/ablation/{domain}-k2-dev")
    weights = root / "pretrain" / start / "model.pt"
    if not weights.exists():
        weights = Path(f"runs/ablation/{domain}-standard/pretrain/{start}/model.pt")
    net, meta = load_model(weights)
    spec = load_dataset_spec(name)
    pool = {p["id"]: p for p in load_pairs(spec, "pool")}
    preprocess = Preprocess(**meta["preprocess"])
    results = Path(f"docs/results/k2-dev/{domain}/results.csv")
    methods = {start: "plain", f"{start}-keep": "keep", f"{start}-adapt": "alone"}
    dev: dict[int, dict[str, float]] = {}
    if results.exists():
        for r in csv.DictReader(open(results)):
            if r["method"] in methods:
                dev.setdefault(int(r["seed"]), {})[methods[r["method"]]] = float(r["dev_dice"])
    label = f"{name}, {start}"
    for s in range(10):
        ids = few_shot_ids(sorted(pool), 2, s)
        share = start_confident_errors(net, spec, preprocess, [pool[i] for i in ids], rule.sure)
        report = root / "finetune" / f"{start}-adapt" / f"b2-s{s}" / "report.json"
        if len(dev.get(s, {})) < len(methods) or not report.exists():
            print(f"| {label} | {s} | {', '.join(ids)} | {share:.2f} | (no development run) | | | | |")
            continue
        decision = json.loads(report.read_text())["decision"]
        vetoed = labels_check(rule, share, Decision(decision, "", []), 2).choice != decision
        d = dev[s]
        d["checked"] = d["keep"] if vetoed else d["alone"]
        print(f"| {label} | {s} | {', '.join(ids)} | {share:.2f} | {decision} | {d['keep']:.3f} | {d['plain']:.3f} | "
              f"{d['alone']:.3f} | {'keep: ' if vetoed else ''}{d['checked']:.3f} |")
    done = [s for s in dev if "checked" in dev[s]]
    if done:
        totals[label] = {k: np.mean([dev[s][k] for s in done]) for k in ROWS}
print()
print("| mean development Dice | " + " | ".join(totals) + " |")
print("|---|" + "---|" * len(totals))
for k, row in ROWS.items():
    print(f"| {row} | " + " | ".join(f"{totals[t][k]:.3f}" for t in totals) + " |")
