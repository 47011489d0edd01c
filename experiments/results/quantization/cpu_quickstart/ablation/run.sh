#!/usr/bin/env bash
# Which quantizer costs top-1 agreement on the CPU quickstart model: each config of this folder is one PTQ setting
# (vlmc validate on the quickstart export at /tmp/qtab/base, 64 validation samples per task); w8_only is also run
# under bf16 autocast to size the float-rounding floor.
set -u
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
HERE=$(cd "$(dirname "$0")" && pwd)
COMMON=(--config experiments/quickstart.yaml --model.init_args.model=/tmp/qtab/base --trainer.enable_progress_bar=false
        --data.init_args.val_samples=64)
for n in w8_only a8_only kv8_only w8a8_nokv w8a8_minmax_nokv w8a8_mse_nokv w8a8_minmax w4a8_minmax; do
  vlmc validate "${COMMON[@]}" --config "$HERE/$n.yaml" --report.filename="$HERE/summary_$n.json"; echo "$n rc=$?"
done
vlmc validate "${COMMON[@]}" --config "$HERE/w8_only.yaml" --trainer.precision=bf16-mixed \
  --report.filename="$HERE/summary_w8_only_bf16.json"
