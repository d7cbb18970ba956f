"""With one label, what the label says about the start: for each one-label development subset of the `standard`
hybrid pretraining (docs/results/k1-dev), the start's Dice on its label and the share of its wrong pixels there that it
is sure of (medhybrid.workflows.adapt.confident_error_share, at the resolution it reads images), beside the development
Dice of keeping the start and of each one-label fine-tune (results.csv of the k1-dev runs). Forward passes only.

    .venv/bin/python docs/results/k1-dev/confident_errors.py > docs/results/k1-dev/confident_errors.md

Needs the k1-dev runs' pretraining and subsets (runs/ablation/<domain>-k1-dev, see README.md)."""

import csv
import json
import math

import numpy as np
import torch

from medhybrid.data.datasets import load_pairs
from medhybrid.data.specs import Preprocess, load_dataset_spec
from medhybrid.data.transforms import preprocessing
from medhybrid.networks.checkpoints import load_model
from medhybrid.workflows.adapt import AdaptRule, confident_error_share, foreground_probability
from medhybrid.workflows.evaluate import predict

CANDIDATES = {"hybrid-keep": "keep", "hybrid": "plain", "hybrid-l2sp": "robust", "hybrid-l2sp-w0.5": "robust 0.5",
              "hybrid-l2sp-w0.25": "robust 0.25"}
rule = AdaptRule()
print("| target | subset | label | start's Dice on it | sure share of its errors | "
      + " | ".join(CANDIDATES.values()) + " | the check's choice |")
print("|---" * (6 + len(CANDIDATES)) + "|")
totals = {}
for domain, name in [("dermoscopy", "ph2"), ("chest_xray", "openist")]:
    root = f"runs/ablation/{domain}-k1-dev"
    net, meta = load_model(f"{root}/pretrain/hybrid/model.pt")
    spec = load_dataset_spec(name)
    pool = {p["id"]: p for p in load_pairs(spec, "pool")}
    pre = preprocessing(spec, Preprocess(**meta["preprocess"]))
    dev: dict[int, dict[str, float]] = {}
    for r in csv.DictReader(open(f"docs/results/k1-dev/{domain}/results.csv")):
        dev.setdefault(int(r["seed"]), {})[r["method"]] = float(r["dev_dice"])
    chosen = []
    for s in sorted(dev):
        i = json.load(open(f"{root}/finetune/hybrid/b1-s{s}/subset.json"))["ids"][0]
        item = pre(dict(pool[i]))
        prob = foreground_probability(predict(net, item["image"][None]))[0]
        label = torch.as_tensor(item["label"])[0]
        valid = label >= 0
        pred, truth = (prob > 0.5) & valid, (label > 0) & valid
        dice = float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum()))
        share = confident_error_share(prob, label, rule.sure)
        switch = not math.isnan(share) and share >= rule.single_label_check
        pick = dev[s]["hybrid-l2sp"] if switch else dev[s]["hybrid-keep"]
        chosen.append(pick)
        print(f"| {name} | {s} | {i} | {dice:.3f} | {share:.2f} | "
              + " | ".join(f"{dev[s][m]:.3f}" for m in CANDIDATES) + f" | {'robust' if switch else 'keep'}: {pick:.3f} |")
    totals[name] = {**{CANDIDATES[m]: np.mean([dev[s][m] for s in dev]) for m in CANDIDATES}, "the check": np.mean(chosen)}
print()
print("| mean development Dice | " + " | ".join(totals) + " |")
print("|---|" + "---|" * len(totals))
for c in [*CANDIDATES.values(), "the check"]:
    print(f"| {c} | " + " | ".join(f"{totals[t][c]:.3f}" for t in totals) + " |")
