"""Before/after the layered layout: every run of the same quick ablation (ISIC 2018 -> PH2), compared run by run.

    python docs/results/layout-before-after/compare.py BEFORE_FOLDER AFTER_FOLDER > comparison.md

For each fine-tune (method x budget x seed) and each zero-shot score: the mean test Dice recorded in state.json, the
largest per-image difference (eval/per_image.csv), and whether the saved weights are bitwise identical; for each
pretraining, whether its weights are identical."""
import csv
import json
import sys
from pathlib import Path

import torch

A, B = Path(sys.argv[1]), Path(sys.argv[2])


def dice(folder: Path) -> float:
    st = json.loads((folder / "state.json").read_text())
    return float((st.get("scores") or st.get("test"))["test_dice"])


def per_image(folder: Path) -> dict[str, float]:
    with open(folder / "eval" / "per_image.csv") as fh:
        return {r["id"]: float(r["dice"]) for r in csv.DictReader(fh)}


def same_weights(fa: Path, fb: Path) -> bool:
    sa, sb = torch.load(fa, weights_only=True), torch.load(fb, weights_only=True)
    key = "state_dict" if "state_dict" in sa else "ensemble"
    return sa[key].keys() == sb[key].keys() and all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key])


rows, worst, worst_img, differing = [], 0.0, 0.0, []
runs = sorted(p.parent for p in (A / "finetune").glob("*/*/state.json"))
for ra in runs:
    rb = B / ra.relative_to(A)
    da, db = dice(ra), dice(rb)
    pa, pb = per_image(ra), per_image(rb)
    assert pa.keys() == pb.keys(), ra
    img = max(abs(pa[k] - pb[k]) for k in pa)
    same = same_weights(ra / "model.pt", rb / "model.pt")
    worst, worst_img = max(worst, abs(da - db)), max(worst_img, img)
    if not same or da != db:
        differing.append(str(ra.relative_to(A)))
    rows.append(f"| {ra.parent.name} | {ra.name} | {da:.6f} | {db:.6f} | {abs(da - db):.1e} | {img:.1e} | "
                f"{'yes' if same else 'NO'} |")
zero = []
for za in sorted((A / "zero-shot").iterdir()):
    zb = B / "zero-shot" / za.name
    zero.append(f"{za.name}: {dice(za):.6f} before, {dice(zb):.6f} after")
pre = [f"{d.name}: {'identical' if same_weights(d / 'model.pt', B / 'pretrain' / d.name / 'model.pt') else 'DIFFERENT'}"
       for d in sorted((A / "pretrain").iterdir())]
print("| method | run | test Dice before | test Dice after | after − before | per-image Dice, largest difference | "
      "weights identical |")
print("|---|---|---|---|---|---|---|")
print("\n".join(rows))
print(f"\n{len(rows)} fine-tunes; largest change of a run's mean test Dice: {worst:.1e}; of an image's Dice: {worst_img:.1e}; "
      f"runs that differ in Dice or weights: {len(differing)} {differing if differing else ''}")
print("\nzero-shot (pretrained heads before fine-tuning): " + "; ".join(zero))
print("\npretrained weights: " + "; ".join(pre))
