#!/usr/bin/env bash
# Reproduces the GPU numbers of README's Results section on one CUDA GPU.
#   bash experiments/run_gpu_results.sh bench   # throughput + MFU of the GPU base at batch $BATCHES, compiled, SmolLM2 shape
#   bash experiments/run_gpu_results.sh train   # trains the GPU base (experiments/pretrain/gpu_base.yaml)
#   bash experiments/run_gpu_results.sh overhead  # each plugin's training overhead (eager, then compiled) + fake-quant bench
#   bash experiments/run_gpu_results.sh profile   # where the step goes at batch $BATCH, eager and with CUDA graphs
# Results land in $OUT (default experiments/results/gpu). Uses CSV logging so it runs where wandb is absent.
set -euo pipefail
OUT=${OUT:-experiments/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>/dev/null || true
LOGGER=(--config experiments/csv_logger.yaml)

case "${1:-bench}" in
bench)
  # Eager steps at each batch size ($BATCHES), beside a plain PyTorch loop; 60 warm-up steps drain the workers'
  # prefetched batches, so the timed steps include data loading at its steady rate. Batch 128 also times decoding
  # with a static cache.
  for batch in ${BATCHES:-128 256 512 1024}; do
    extra=(); [ "$batch" = 128 ] && extra=(--static_cache)
    $PY -m framework.cli bench --config experiments/pretrain/gpu_base.yaml "${LOGGER[@]}" \
      --data.init_args.batch_size="$batch" --data.init_args.num_workers=14 --steps 40 --warmup 60 --plain --profile 5 \
      "${extra[@]}" --out "$OUT/bench_gpu_base_b$batch.json" 2>&1 | tail -n 20 || true
  done
  $PY -m framework.cli bench --config experiments/pretrain/smollm2_vlm.yaml "${LOGGER[@]}" \
    --model.init_args.model=experiments/models/llava-smollm2-shape.json --model.init_args.text_gguf=null \
    --trainer.accelerator=gpu --data.init_args.num_workers=8 --steps 20 --warmup 10 \
    --out "$OUT/bench_smollm2_shape.json" 2>&1 | tail -n 20
  # At the largest batch: regional torch.compile of every transformer block, then fixed shapes (every batch padded
  # to max_length) with CUDA graphs, the remedy for a launch-bound step.
  big=${COMPILE_BATCH:-1024}
  $PY -m framework.cli bench --config experiments/pretrain/gpu_base.yaml "${LOGGER[@]}" --model.init_args.compile=true \
    --data.init_args.batch_size="$big" --data.init_args.num_workers=14 \
    --steps 40 --warmup 60 --plain --out "$OUT/bench_gpu_base_b${big}_compiled.json" 2>&1 | tail -n 20 || true
  $PY -m framework.cli bench --config experiments/pretrain/gpu_base.yaml "${LOGGER[@]}" --model.init_args.compile=true \
    --model.init_args.compile_mode=reduce-overhead --data.init_args.pad_to_max_length=true \
    --data.init_args.batch_size="$big" --data.init_args.num_workers=14 \
    --steps 40 --warmup 60 --plain --out "$OUT/bench_gpu_base_b${big}_cudagraphs.json" 2>&1 | tail -n 20 || true
  ;;
overhead)
  # Step time with each plugin / without it (random weights, batch 128), then one fake quantizer fused vs written
  # out in elementwise operations. Wants the GPU otherwise idle.
  $PY experiments/plugin_overhead.py --out "$OUT/overhead.json" 2>&1 | tail -n 12
  # Eager, QAT's 193 quantizers and L0's mask hooks cost host time per small kernel; compiled blocks fuse them.
  $PY experiments/plugin_overhead.py --plugins qat_w4a8 l0_50_improved ramp75_activation --compile \
    --out "$OUT/overhead_compiled.json" 2>&1 | tail -n 6
  $PY -m plugins.quantization.bench --out "$OUT/bench_fake_quant.json" 2>&1 | tail -n 12
  ;;
profile)
  # The profiler's view of 5 steps (kernel time, busy share, top operators) next to the unprofiled step rate.
  batch=${BATCH:-256}
  $PY -m framework.cli bench --config experiments/pretrain/gpu_base.yaml "${LOGGER[@]}" \
    --data.init_args.batch_size="$batch" --data.init_args.num_workers=14 --steps 40 --warmup 60 --profile 5 \
    --new_tokens 4 --out "$OUT/profile_gpu_base_b$batch.json" 2>&1 | tail -n 30 || true
  $PY -m framework.cli bench --config experiments/pretrain/gpu_base.yaml "${LOGGER[@]}" --model.init_args.compile=true \
    --model.init_args.compile_mode=reduce-overhead --data.init_args.pad_to_max_length=true \
    --data.init_args.batch_size="$batch" --data.init_args.num_workers=14 --steps 40 --warmup 60 --profile 5 \
    --new_tokens 4 --out "$OUT/profile_gpu_base_b${batch}_cudagraphs.json" 2>&1 | tail -n 30 || true
  ;;
train)
  STEPS=${STEPS:-4000}
  start=$(date +%s)
  # Bounded by TRAIN_LIMIT seconds so the logs below are kept even if the run is cut short.
  timeout "${TRAIN_LIMIT:-3600}" $PY -m framework.cli fit --config experiments/pretrain/gpu_base.yaml "${LOGGER[@]}" \
    --trainer.max_steps="$STEPS" --trainer.val_check_interval=$((STEPS / 4)) --trainer.log_every_n_steps=20 \
    --trainer.enable_progress_bar=false --checkpoint.dirpath=/tmp/vlmc_gpu_base \
    --report.filename="$(cd "$OUT" && pwd)/summary_gpu_base.json" > "$OUT/train_gpu_base.log" 2>&1 || true
  echo "wall_seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/train_gpu_base.log"
  cp runs/csv/version_*/metrics.csv "$OUT/train_gpu_base_metrics.csv" 2>/dev/null || true
  grep -v -i "warn" "$OUT/train_gpu_base.log" | tail -n 15
  ;;
esac
