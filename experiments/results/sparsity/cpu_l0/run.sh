#!/usr/bin/env bash
# L0 at CPU scale: the quickstart model (exported at $BASE) fine-tuned 600 steps with each config of this folder,
# 64 validation samples per task; summaries land beside this script.
set -u
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${BASE:-/tmp/qtab/base}
for c in dense_finetune l0_50_improved_hard20 l0_50_improved_hard50 l0_50_improved_hard80 l0_50_plain \
         l0_90_improved_hard20 l0_90_improved_hard80 l0_90_plain; do
  vlmc fit --config experiments/quickstart.yaml --config "$HERE/$c.yaml" --model.init_args.model="$BASE" \
    --model.init_args.lr=1e-3 --trainer.max_steps=600 --trainer.val_check_interval=600 \
    --trainer.enable_progress_bar=false --checkpoint.dirpath="/tmp/cpu_l0/$c" \
    --report.filename="$HERE/summary_$c.json" > "/tmp/cpu_l0_$c.log" 2>&1
  echo "$c rc=$?"
done
# The L0 runs' pruned shape (llava-tiny-l0-50.json, from `python -m plugins.l0_pruning.spec --base
# experiments/models/llava-tiny.json --fraction 0.5`) trained from scratch with the same compute as the quickstart
# base (1800 steps) plus an L0 run (600 steps), both at batch 16: 2400 x 1.90M / 0.99M non-embedding parameters.
vlmc fit --config experiments/quickstart.yaml --model.init_args.model="$HERE/llava-tiny-l0-50.json" \
  --trainer.max_steps=4594 --trainer.val_check_interval=1000 --trainer.check_val_every_n_epoch=null \
  --trainer.enable_progress_bar=false \
  --checkpoint.dirpath=/tmp/cpu_l0/scratch --report.filename="$HERE/summary_l0_scratch50.json" > /tmp/cpu_l0_scratch.log 2>&1
echo "l0_scratch50 rc=$?"
# The same shape from scratch with only the L0 run's compute (600 steps x 1.90M / 0.99M = 1152 steps at batch 16):
# the comparison Sheared-LLaMA makes, where the base is given.
vlmc fit --config experiments/quickstart.yaml --model.init_args.model="$HERE/llava-tiny-l0-50.json" \
  --trainer.max_steps=1152 --trainer.val_check_interval=1152 --trainer.check_val_every_n_epoch=null \
  --trainer.enable_progress_bar=false --checkpoint.dirpath=/tmp/cpu_l0/scratch_l0compute \
  --report.filename="$HERE/summary_l0_scratch50_l0compute.json" > /tmp/cpu_l0_scratch_l0compute.log 2>&1
echo "l0_scratch50_l0compute rc=$?"
