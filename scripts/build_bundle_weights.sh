#!/usr/bin/env bash
# Build the weights of the MONAI bundle bundles/medhybrid_2d_segmentation by running the bundle's own workflows on
# the shipped data (../shared/data, or $MEDHYBRID_DATA_ROOT):
#
#   1. verify_metadata                 configs/metadata.json against configs/schema/meta_schema.json (offline)
#   2. pretrain  (hybrid, ISIC 2018)   -> runs/pretrain-hybrid/model.pt
#   3. finetune  (5 PH2 labels)        -> runs/finetune-hybrid-b5-s0/model.pt, published as models/model.pt
#   4. evaluate  (PH2 test split)      -> eval/metrics.json, eval/per_image.csv
#   5. ckpt_export (TorchScript)       -> models/model.ts
#   6. the results table of docs/README.md (default configuration only)
#
# Usage (from anywhere):
#   scripts/build_bundle_weights.sh [--mlflow] [monai.bundle overrides ...]
#   scripts/build_bundle_weights.sh --device cuda
#   scripts/build_bundle_weights.sh --mlflow --mlflow_tracking_uri sqlite:////abs/path/mlflow.db
#   scripts/build_bundle_weights.sh --bundle_root /tmp/b --pretrain_train#epochs 1     # a trial build elsewhere
#
# Idempotent: a finished pretraining or fine-tuning run (same configuration) is returned as is and an interrupted one
# resumes from its last checkpoint; evaluation and export are deterministic and simply redone. The weights (models/)
# and outputs (runs/, eval/) are not committed (.gitignore). Overrides (--id value or --id=value) go to each step whose
# configs define their top-level id (--device, --bundle_root to all; --pretrain_train#epochs 1 to pretraining only);
# with any override but --device and --mlflow_tracking_uri the README is left alone (its table documents the default
# build). Python: $PYTHON, else .venv/bin/python.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$REPO/bundles/medhybrid_2d_segmentation"
PY="${PYTHON:-$REPO/.venv/bin/python}"

extra=()
if [[ "${1:-}" == "--mlflow" ]]; then
    extra=("configs/mlflow.yaml")
    shift
fi
overrides=("$@")
bundle_root="."
changed=0  # overrides that change what is built (anything but --device and --mlflow_tracking_uri)
for ((i = 0; i < ${#overrides[@]}; i++)); do
    case "${overrides[$i]}" in
        --bundle_root) bundle_root="${overrides[$((i + 1))]}"; changed=1 ;;
        --bundle_root=*) bundle_root="${overrides[$i]#--bundle_root=}"; changed=1 ;;
        --device | --mlflow_tracking_uri) i=$((i + 1)) ;;
        --device=* | --mlflow_tracking_uri=*) ;;
        --*) changed=1 ;;
    esac
done

configs() {  # configs/common.yaml + the given files, in monai.bundle's list syntax
    local out="'configs/common.yaml'"
    for c in "$@"; do out+=",'$c'"; done
    echo "[$out]"
}

select_overrides() {  # select_overrides FILE...: set $stage to the overrides for a step built from configs/common.yaml + FILE...
    stage=()
    local i=0 n key top
    while ((i < ${#overrides[@]})); do
        if [[ "${overrides[$i]}" == --*=* ]]; then key="${overrides[$i]%%=*}"; n=1; else key="${overrides[$i]}"; n=2; fi
        key="${key#--}"; top="${key%%#*}"; top="${top%%::*}"
        # a plain id is set (or added) anywhere; a nested one (a#b) only where its top-level id exists
        if [[ "$key" == "$top" ]] || grep -qE "^\"?${top}(:|#)" configs/common.yaml "$@"; then
            stage+=("${overrides[@]:i:n}")
        fi
        i=$((i + n))
    done
}

cd "$BUNDLE"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
started=$(date +%s)

echo "== verify_metadata"
"$PY" -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath configs/schema/meta_schema.json

for step in pretrain finetune evaluate; do
    echo "== $step"
    files=("configs/$step.yaml")
    [[ "$step" != evaluate ]] && files+=("${extra[@]}")
    select_overrides "${files[@]}"
    "$PY" -m monai.bundle run --config_file "$(configs "${files[@]}")" "${stage[@]}"
done

pretrained="$bundle_root/runs/pretrain-hybrid/model.pt"
if [[ -f "$pretrained" ]]; then
    echo "== models/pretrained.pt (the hybrid pretraining: where MONAI Label's training starts, medhybrid/label)"
    "$PY" -c "import sys; from medhybrid.inference import publish_model; publish_model(sys.argv[1], sys.argv[2])" \
        "$pretrained" "$bundle_root/models/pretrained.pt"
fi

echo "== ckpt_export"
select_overrides configs/inference.yaml
"$PY" -m monai.bundle ckpt_export network_def --filepath "$bundle_root/models/model.ts" --ckpt_file "$bundle_root/models/model.pt" \
    --meta_file configs/metadata.json --config_file "$(configs configs/inference.yaml)" --key_in_ckpt state_dict --use_trace True \
    "${stage[@]}"

if [[ $changed -eq 0 ]]; then
    echo "== docs/README.md results"
    "$PY" - "$bundle_root/eval/metrics.json" "$bundle_root/models/model.pt" docs/README.md "$(( $(date +%s) - started ))" <<'EOF'
import datetime
import hashlib
import json
import re
import sys
from pathlib import Path

import torch

import medhybrid

metrics_path, model_path, readme, seconds = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
m = json.loads(metrics_path.read_text())
meta = torch.load(model_path, map_location="cpu", weights_only=True)["meta"]
sha = hashlib.sha256(model_path.read_bytes()).hexdigest()[:12]
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
fmt = lambda v, d=4: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
block = "\n".join([
    "<!-- results:start -->",
    f"Built {datetime.date.today().isoformat()} by `scripts/build_bundle_weights.sh` (medhybrid {medhybrid.__version__}, "
    f"{device}, {seconds // 60} min for the steps run this time; `models/model.pt` sha256 `{sha}…`).",
    "",
    "| target test split | images | label budget | seed | Dice | IoU | HD95 (px) |",
    "|---|---|---|---|---|---|---|",
    f"| {m['dataset']} `{m['split']}` | {int(m['test_images'])} | {meta.get('budget')} | {meta.get('seed')} | "
    f"{fmt(m['test_dice'])} | {fmt(m['test_iou'])} | {fmt(m['test_hd95'], 1)} |",
    "",
    "Means over the test images at their native resolution; per-image values in `eval/per_image.csv`.",
    "<!-- results:end -->",
])
text = Path(readme).read_text()
new, n = re.subn(r"<!-- results:start -->.*?<!-- results:end -->", lambda _: block, text, flags=re.S)
if n != 1:
    sys.exit(f"{readme}: no results markers found")
Path(readme).write_text(new)
print(block)
EOF
else
    echo "== overrides given: docs/README.md left as is; metrics in $bundle_root/eval/metrics.json"
    cat "$bundle_root/eval/metrics.json"
fi
