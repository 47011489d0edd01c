#!/usr/bin/env bash
# The quantization table at CPU scale: the quickstart model exported to /tmp/qtab/base (vlmc export of its last.ckpt),
# configs from make_configs.py in /tmp/qtab/cfg; PTQ at W8A8/W4A8/W4A16/W2A8, then QAT (the QAT part was not run to the end).
set -u
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
Q=/work/main/experiments/quickstart.yaml
COMMON=(--model.init_args.model=/tmp/qtab/base --trainer.enable_progress_bar=false --data.init_args.val_samples=64)
for c in cfg/ptq_*.yaml; do n=$(basename $c .yaml)
  vlmc validate --config $Q --config $c "${COMMON[@]}" --report.filename=/tmp/qtab/out/summary_$n.json > logs/$n.log 2>&1; echo "$n rc=$?"
done
vlmc fit --config $Q "${COMMON[@]}" --model.init_args.lr=2e-4 --trainer.max_steps=300 --trainer.val_check_interval=300 --checkpoint.dirpath=/tmp/qtab/ck/dense_ft --report.filename=/tmp/qtab/out/summary_dense_finetune.json > logs/dense_ft.log 2>&1; echo "dense_ft rc=$?"
for c in cfg/qat_*_ch.yaml cfg/qat_*_g32.yaml; do n=$(basename $c .yaml)
  vlmc fit --config $Q --config $c "${COMMON[@]}" --model.init_args.lr=2e-4 --trainer.max_steps=300 --trainer.val_check_interval=300 --checkpoint.dirpath=/tmp/qtab/ck/$n --report.filename=/tmp/qtab/out/summary_$n.json > logs/$n.log 2>&1; echo "$n rc=$?"
done
