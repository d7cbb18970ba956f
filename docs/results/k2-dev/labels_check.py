"""With two labels, what the labels say about the start: for each two-label development subset of the `standard`
hybrid pretraining, the held-out rule's decision (the k2-dev runs' `hybrid-adapt`), the share of the start's wrong
pixels on both labels that it is sure of (medhybrid.workflows.adapt.start_confident_errors), and the development Dice
of keeping the start, of plain fine-tuning, of the held-out rule alone and of the rule with the labels' check
(rule.label_check_up_to = 2). Forward passes only; OpenIST's shares need no run (its subsets are the pool ids drawn
with the same seeds).

    .venv/bin/python docs/results/k2-dev/labels_check.py > docs/results/k2-dev/labels_check.md

Needs the PH2 k2-dev runs (runs/ablation/dermoscopy-k2-dev, see README.md)."""

import csv
import json
from pathlib import Path

import numpy as np

from medhybrid.data.datasets import few_shot_ids, load_pairs
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.networks.checkpoints import load_model
from medhybrid.workflows.adapt import KEEP, AdaptRule, Decision, labels_check, start_confident_errors

rule = AdaptRule()
print("| target | subset | labels | sure share of the start's errors | held-out rule | keep | plain | held-out rule "
      "alone | with the labels' check |")
print("|---" * 9 + "|")
totals = {}
for domain, name in [("dermoscopy", "ph2"), ("chest_xray", "openist")]:
    root = Path(f"runs/ablation/{domain}-k2-dev")
    pre_model = root / "pretrain" / "hybrid" / "model.pt"
    if not pre_model.exists():
        pre_model = Path(f"runs/ablation/{domain}-standard/pretrain/hybrid/model.pt")
    net, meta = load_model(pre_model)
    spec = load_dataset_spec(name)
    pool = {p["id"]: p for p in load_pairs(spec, "pool")}
    preprocess = Preprocess(**meta["preprocess"])
    results = Path(f"docs/results/k2-dev/{domain}/results.csv")
    dev: dict[int, dict[str, float]] = {}
    if results.exists():
        for r in csv.DictReader(open(results)):
            dev.setdefault(int(r["seed"]), {})[r["method"]] = float(r["dev_dice"])
    alone, checked = [], []
    for s in range(10):
        ids = few_shot_ids(sorted(pool), 2, s)
        share = start_confident_errors(net, spec, preprocess, [pool[i] for i in ids], rule.sure)
        report = root / "finetune" / "hybrid-adapt" / f"b2-s{s}" / "report.json"
        if s not in dev or not report.exists():
            print(f"| {name} | {s} | {', '.join(ids)} | {share:.2f} | (no development run) | | | | |")
            continue
        decision = json.loads(report.read_text())["decision"]
        vetoed = labels_check(rule, share, Decision(decision, "", []), 2).choice != decision
        d = dev[s]
        a, c = d["hybrid-adapt"], d["hybrid-keep"] if vetoed else d["hybrid-adapt"]
        alone.append(a)
        checked.append(c)
        print(f"| {name} | {s} | {', '.join(ids)} | {share:.2f} | {decision} | {d['hybrid-keep']:.3f} | {d['hybrid']:.3f} | "
              f"{a:.3f} | {'keep: ' if vetoed else ''}{c:.3f} |")
    if dev:
        totals[name] = {"keep": np.mean([dev[s]["hybrid-keep"] for s in dev]),
                        "plain": np.mean([dev[s]["hybrid"] for s in dev]),
                        "held-out rule alone": np.mean(alone), "with the labels' check": np.mean(checked)}
print()
print("| mean development Dice | " + " | ".join(totals) + " |")
print("|---|" + "---|" * len(totals))
for c in ["keep", "plain", "held-out rule alone", "with the labels' check"]:
    print(f"| {c} | " + " | ".join(f"{totals[t][c]:.3f}" for t in totals) + " |")
