"""Before/after a code reorganisation: the same small ablation (its methods, budget 2, seed 0, 2 pretraining epochs, one thread)."""
import csv
import sys
from pathlib import Path

import torch

A, B = Path(sys.argv[1]), Path(sys.argv[2])
def rows(p):
    with open(p / "report" / "results.csv") as fh:
        return {r["method"]: r for r in csv.DictReader(fh)}
ra, rb = rows(A), rows(B)
out = ["| method | test Dice before | test Dice after | after − before (absolute) | "
       "per-image Dice, largest absolute difference | final weights identical |", "|---|---|---|---|---|---|"]
worst = 0.0
for m in ra:
    da, db = float(ra[m]["test_dice"]), float(rb[m]["test_dice"])
    pa = {r["id"]: float(r["dice"]) for r in csv.DictReader(open(A / "finetune" / m / "b2-s0" / "eval" / "per_image.csv"))}
    pb = {r["id"]: float(r["dice"]) for r in csv.DictReader(open(B / "finetune" / m / "b2-s0" / "eval" / "per_image.csv"))}
    assert pa.keys() == pb.keys()
    img = max(abs(pa[k] - pb[k]) for k in pa)
    fa, fb = A / "finetune" / m / "b2-s0" / "model.pt", B / "finetune" / m / "b2-s0" / "model.pt"
    sa, sb = torch.load(fa, weights_only=True), torch.load(fb, weights_only=True)
    key = "state_dict" if "state_dict" in sa else "ensemble"
    same = all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key])
    worst = max(worst, abs(da - db))
    out.append(f"| {m} | {da:.6f} | {db:.6f} | {abs(da - db):.1e} | {img:.1e} | {'yes' if same else 'NO'} |")
pre = []
for d in sorted((A / "pretrain").iterdir()):
    sa = torch.load(d / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(B / "pretrain" / d.name / "model.pt", weights_only=True)["state_dict"]
    pre.append(f"{d.name}: {'identical' if all(torch.equal(sa[k], sb[k]) for k in sa) else 'DIFFERENT'}")
print("\n".join(out))
print("\npretrained weights:", "; ".join(pre))
print(f"\nlargest change of a run's mean test Dice: {worst:.1e}")
