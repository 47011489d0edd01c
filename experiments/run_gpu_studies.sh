#!/usr/bin/env bash
# The sparsity and quantization studies on one multi-GPU host, from one shared dense base:
#   bash experiments/run_gpu_studies.sh            # runs everything in the background of this shell, waits
#   WORK=/tmp/vlmc_studies bash experiments/run_gpu_studies.sh
#   bash experiments/run_gpu_studies.sh pack results.tgz   # results, logs and export JSONs so far, one archive
#   REUSE=experiments/results/sparsity/summaries bash experiments/run_gpu_studies.sh   # only the missing sparsity runs
#
# 1. experiments/sparsity_study.py trains the dense base on GPU 0 (and the same-compute from-scratch baseline of the
#    50%-pruned shape on GPU 1), then runs its sweep over every GPU.
# 2. The 2:4 kernel benchmark and 10-minute recipes for the GPU base ($RECIPES: batch 128, 8 px patches) use the
#    last two GPUs while the base trains.
# 3. Once the base is exported, experiments/quantization_study.py starts from it and shares the GPUs with the sweep.
# 4. With both studies done, the training overhead of every plugin is measured, one benchmark per GPU.
# Summaries, tables and logs land under $WORK/results/{sparsity,quantization,gpu}; copy them into
# experiments/results/ to publish. CSV logging, so it runs where wandb is absent.
set -uo pipefail
WORK=${WORK:-/tmp/vlmc_studies}
PY=${PYTHON:-python3}
RES=$WORK/results
if [ "${1:-}" = pack ]; then  # no checkpoints or weights: summaries, tables, logs, bits-per-value and shape JSONs
  cd "$WORK" && find results logs driver.log */logs */exports -maxdepth 2 \( -name '*.json' -o -name '*.csv' \
    -o -name '*.log' -o -name '*.txt' -o -name driver.log \) -size -4M 2>/dev/null | tar czf "$2" -T -
  exit
fi
GPUS=${GPUS:-$($PY -c "import torch; print(torch.cuda.device_count())")}
mkdir -p "$RES/sparsity" "$RES/quantization" "$RES/gpu" "$WORK/logs"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Both studies' runs share the host's cores: a few threads each (one per core each starved the GPUs).
CORES=$(nproc); export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / (2 * GPUS + 4) > 0 ? CORES / (2 * GPUS + 4) : 1 ))}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RES/gpu/gpu.txt" 2>/dev/null || true
last=$((GPUS - 1)); second_last=$((GPUS > 1 ? GPUS - 2 : 0))
log() { echo "[$(date +%T)] $*" | tee -a "$WORK/driver.log"; }

# REUSE=experiments/results/sparsity/summaries: runs with a committed summary are not run again (the base always is:
# the sweep needs its export). Studies are deterministic on one GPU type: a re-run reproduced every metric.
if [ -n "${REUSE:-}" ]; then
  for f in "$REUSE"/summary_*.json; do
    case "$(basename "$f")" in summary_dense_base.json) ;; *) cp "$f" "$RES/sparsity/" ;; esac
  done
fi
log "sparsity study: base, sweep, latency"
$PY experiments/sparsity_study.py base sweep latency collect --out "$RES/sparsity" --work "$WORK/sparsity" \
  --base_steps 2000 --ft_steps 500 --l0_steps 1200 --parallel "${SPARSITY_PARALLEL:-$GPUS}" --gpus "$GPUS" \
  > "$WORK/logs/sparsity_study.log" 2>&1 &
sparsity=$!

recipe() {  # name gpu steps overrides...: a GPU-base recipe, cut at 10 minutes like the issue's budget
  local name=$1 gpu=$2 steps=$3; shift 3
  local start=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpu timeout 600 $PY -m framework.cli fit --config experiments/pretrain/gpu_base.yaml \
    --config experiments/csv_logger.yaml --trainer.max_steps="$steps" --trainer.val_check_interval=$((steps / 4)) \
    --trainer.enable_progress_bar=false --checkpoint.dirpath="$WORK/ckpt/$name" \
    --trainer.logger.init_args.save_dir="$WORK/runs/$name" \
    --report.filename="$RES/gpu/summary_$name.json" "$@" > "$WORK/logs/$name.log" 2>&1
  log "$name rc=$? in $(( $(date +%s) - start )) s"
  cp "$WORK"/runs/"$name"/*/version_*/metrics.csv "$RES/gpu/metrics_$name.csv" 2>/dev/null || true
}
RECIPES=${RECIPES:-b128}  # which 10-minute base recipes run beside the base: any of b128 p8
(
  CUDA_VISIBLE_DEVICES=$second_last $PY -m plugins.sparsity.bench --model experiments/models/llava-base-gpu.json \
    --out "$RES/sparsity/bench_sparse24.json" > "$WORK/logs/kernels.log" 2>&1
  log "kernels rc=$?"
  case " $RECIPES " in *" b128 "*)
    recipe recipe_b128 "$second_last" 4000 --data.init_args.batch_size=128 --trainer.check_val_every_n_epoch=null ;;
  esac
) &
case " $RECIPES " in *" p8 "*)
  recipe recipe_p8 "$last" 1600 --model.init_args.model=experiments/models/llava-base-gpu-p8.json \
    --data.init_args.max_length=352 & ;;
esac

base=$WORK/sparsity/exports/dense_base
while [ ! -f "$base/config.json" ]; do
  kill -0 $sparsity 2>/dev/null || { log "sparsity study ended before the base was exported"; break; }
  sleep 10
done
if [ -f "$base/config.json" ]; then
  log "quantization study from $base"
  $PY experiments/quantization_study.py table runtime mixed qalft stacked collect --base_export "$base" \
    --out "$RES/quantization" --work "$WORK/quantization" --qat_steps 500 --lora_steps 400 \
    --parallel "${QUANTIZATION_PARALLEL:-$GPUS}" --gpus "$GPUS" > "$WORK/logs/quantization_study.log" 2>&1
  log "quantization study rc=$?"
fi
wait $sparsity; log "sparsity study rc=$?"
wait

log "overheads"
CUDA_VISIBLE_DEVICES=0 $PY experiments/plugin_overhead.py --out "$RES/sparsity/overhead.json" \
  > "$WORK/logs/overhead_sparsity.log" 2>&1 &
if [ -f "$base/config.json" ]; then
  CUDA_VISIBLE_DEVICES=$((GPUS > 1 ? 1 : 0)) $PY experiments/quantization_study.py overhead --base_export "$base" \
    --out "$RES/quantization" --work "$WORK/quantization" > "$WORK/logs/overhead_quantization.log" 2>&1 &
fi
wait
log "all done"
