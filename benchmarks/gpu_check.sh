#!/usr/bin/env bash
# The GPU run, as one script (about 8 minutes on one H100):
#   1. pretraining throughput and peak GPU memory at the `full` profile's resolution, network and batch: fp32, then
#      bf16 autocast with channels-last, then that under torch.compile, side by side with their ratios
#      (benchmarks/precision_throughput.py);
#   2. a shortened `full` ablation on ISIC 2018 -> PH2: scratch, supervised, diffusion, hybrid and nnU-Net; 2 and 5
#      labels; seed 0; 500 pretraining iterations instead of 20,000, nnU-Net's one-epoch trainer instead of its 1000
#      epochs; ending in its report (Dice table, paired comparisons, the generative-pretext line, zero-shot rows).
# Everything lands in $OUT (default gpu-check/): throughput.txt/json, the ablation folder and its report, ablation.log,
# nvidia-smi.txt. Run from the repository after `bash scripts/setup.sh`:
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # minutes on a CPU: the same steps at toy sizes (what the tests run)
# METHODS='[scratch,hybrid]' runs a selection of the ablation's methods.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
start=$(date +%s)

if [ "${1:-}" = "--smoke" ]; then
  net=('pretrain.preprocess.resolution=32' 'pretrain.model.channels=[16,32,32,32]' 'pretrain.model.norm_num_groups=8'
       'pretrain.model.attention_levels=[false,false,false,false]' 'pretrain.model.num_res_blocks=1')
  throughput=(--iters 2 --no-compile --set "${net[@]}" 'pretrain.train.batch_size=4')
  ablation=("${net[@]}" 'pretrain.train.epochs=1' 'pretrain.train.epoch_length=2' 'pretrain.train.batch_size=4'
            'pretrain.train.warmup_iterations=0' 'pretrain.train.val_max_images=4' 'pretrain.train.num_workers=0'
            'finetune.schedule.min_iterations=2' 'finetune.schedule.max_iterations=2' 'finetune.schedule.epochs=1'
            'finetune.train.batch_size=2' 'finetune.train.warmup_iterations=0' "nnunet.trainer=${NNUNET_TRAINER:-nnUNetTrainer_1epoch}"
            'budgets=[2]' "source=${SMOKE_SOURCE:-isic2018}" "target=${SMOKE_TARGET:-ph2}")
else
  throughput=(--iters 30)
  ablation=('pretrain.train.epochs=5' 'pretrain.train.epoch_length=100' 'pretrain.train.warmup_iterations=100'
            'nnunet.trainer=nnUNetTrainer_1epoch' 'budgets=[2,5]')
fi

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (nvidia-smi not found)") \
  | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

echo "== 1. pretraining throughput at the full profile: fp32, bf16 + channels-last, + torch.compile"
"$PY" benchmarks/precision_throughput.py --config dermoscopy --profile full --json "$OUT/throughput.json" "${throughput[@]}" \
  | tee "$OUT/throughput.txt"

echo "== 2. a shortened full ablation: scratch, supervised, diffusion, hybrid, nnunet"
t=$(date +%s)
"$PY" -m medhybrid.cli ablate --config dermoscopy --profile full name=gpu-check "output_dir=$OUT/ablation" \
  "methods=${METHODS:-[scratch,supervised,diffusion,hybrid,nnunet]}" 'seeds=[0]' reference=hybrid "${ablation[@]}" 2>&1 \
  | tee "$OUT/ablation.log" | grep -E "^report:|^plot:|failed|error" || true
test -f "$OUT/ablation/report/report.md"
echo "ablation: $(( $(date +%s) - t )) s; report $OUT/ablation/report/report.md"
sed -n '1,40p' "$OUT/ablation/report/report.md"
nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | sed 's/^/GPU memory in use at the end: /' || true
echo "gpu_check: $(( $(date +%s) - start )) s in all"
