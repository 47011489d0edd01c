#!/usr/bin/env bash
# L0 at CPU scale: the quickstart model (exported at $BASE) fine-tuned 600 steps with each config of this folder,
# 64 validation samples per task; summaries land beside this script.
set -u
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${BASE:-/tmp/qtab/base}
for c in dense_finetune l0_50_improved l0_50_improved_hard50 l0_50_improved_hard80 l0_50_plain; do
  vlmc fit --config experiments/quickstart.yaml --config "$HERE/$c.yaml" --model.init_args.model="$BASE" \
    --model.init_args.lr=1e-3 --trainer.max_steps=600 --trainer.val_check_interval=600 \
    --trainer.enable_progress_bar=false --checkpoint.dirpath="/tmp/cpu_l0/$c" \
    --report.filename="$HERE/summary_$c.json" > "/tmp/cpu_l0_$c.log" 2>&1
  echo "$c rc=$?"
done
