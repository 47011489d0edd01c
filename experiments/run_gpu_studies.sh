#!/usr/bin/env bash
# The sparsity and quantization studies on one multi-GPU host, from one shared dense base:
#   bash experiments/run_gpu_studies.sh            # runs everything in the background of this shell, waits
#   WORK=/tmp/vlmc_studies bash experiments/run_gpu_studies.sh
#   bash experiments/run_gpu_studies.sh pack results.tgz   # results, logs and export JSONs so far, one archive
#   REUSE=experiments/results/sparsity/summaries bash experiments/run_gpu_studies.sh   # only the missing sparsity runs
#   REUSE=... RERUN="dense_finetune ramp75 ramp2of4" bash experiments/run_gpu_studies.sh   # and these again
#   QUANT_REUSE="experiments/results/quantization/gpu_h200x2_run19" ... reading_stack   # those quantization runs not again
#   QUANT_STAGES="mixed qalft runtime collect" bash experiments/run_gpu_studies.sh      # some quantization stages
#   bash experiments/run_gpu_studies.sh reading   # the studies on the base that reads (gpu_reading.yaml), see below
#   bash experiments/run_gpu_studies.sh reading_goals   # its goals' runs that fit 10 minutes on two GPUs, see below
#   bash experiments/run_gpu_studies.sh reading_stack   # 75% + W4A8 over the whole model on that base (two GPUs)
#   bash experiments/run_gpu_studies.sh reading_l0_stack   # reading_l0 and reading_stack side by side on one base
#   bash experiments/run_gpu_studies.sh reading_rest    # L0 50% and QALFT on that base, the next 10 minutes on two
#   KEEP_BASE=1 bash experiments/run_gpu_studies.sh reading_l0   # L0's references and distilled L0 on that base
#   RECIPES="256:8.0e-4 256:8.0e-4::0.3" bash experiments/run_gpu_studies.sh recipes    # only recipes, one per GPU
#   RECIPE_STEPS=5400 RECIPES="256:8.0e-4:cudagraphs" bash experiments/run_gpu_studies.sh recipes  # no sizing benchmark
#   RECIPE_MAX_TIME=00:00:08:40 ...  # trainer.max_time of a recipe's fit (default 9 minutes)
#   RECIPE_ARGS="--model.init_args.compile_dynamic=false" ...  # more CLI arguments for every recipe
#   RECIPE_GPU_OFFSET=2 ...  # recipes on GPUs 2, 3, ... (other work holds the first ones)
#   RECIPES="256:8.0e-4:::digits" ...  # with the digit-splitting tokenizer (framework/assets/tokenizer_digits.json)
#   RECIPES="256:8.0e-4::::vision_tower=0.5" ...  # model.lr_multipliers: the vision tower at half the learning rate
#   RECIPES="128:6.0e-4:cudagraphs::::256px:3500" ...  # a reading variant (experiments/pretrain/reading/256px.yaml),
#                                                      # 3500 steps (an entry's own steps beat RECIPE_STEPS)
#
# 1. experiments/sparsity_study.py trains the dense base on GPU 0 (and the same-compute from-scratch baseline of the
#    50%-pruned shape on GPU 1), then runs its sweep; each run takes the least busy unreserved GPU.
# 2. With four GPUs or more, the last two are reserved: 10-minute recipes for the GPU base ($RECIPES,
#    batch:lr[:compile|:cudagraphs[:decay_fraction[:tokenizer[:multipliers]]]] entries; a decay fraction below 1
#    holds the peak learning rate until the last part of training; tokenizer "digits" picks
#    framework/assets/tokenizer_digits.json; multipliers "regex=factor,..." set model.lr_multipliers), then the
#    throughput table (experiments/run_gpu_results.sh bench) and the training overhead of every plugin, each with
#    its GPU otherwise idle; then the studies get them too. (The 2:4 kernel table is the sparsity
#    study's `kernels` stage: `python experiments/sparsity_study.py kernels`.)
# 3. Once the base is exported, experiments/quantization_study.py starts from it and shares the GPUs with the sweep.
# With fewer GPUs the overheads come last, after both studies.
# Summaries, tables and logs land under $WORK/results/{sparsity,quantization,gpu}; copy them into
# experiments/results/ to publish. CSV logging, so it runs where wandb is absent.
set -uo pipefail
WORK=${WORK:-/tmp/vlmc_studies}
PY=${PYTHON:-python3}
RES=$WORK/results
if [ "${1:-}" = pack ]; then  # no checkpoints or weights: summaries, tables, logs, bits-per-value and shape JSONs,
  # and every run's validation history as it stands (a run stopped before its end still has its earlier validations)
  cd "$WORK" && { find results logs driver.log */logs */exports -maxdepth 2 \( -name '*.json' -o -name '*.csv' \
    -o -name '*.log' -o -name '*.txt' -o -name driver.log \) -size -4M 2>/dev/null
    find . -path './*/runs/*/runs/csv/version_*/metrics.csv' -size -4M 2>/dev/null | sed 's|^\./||'; } | tar czf "$2" -T -
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
# Each study run's validation history (CSV logger) beside its summary: $RES/<study>/metrics_<run>.csv.
copy_run_metrics() {
  local f run study
  for f in "$WORK"/{sparsity,quantization}/runs/*/runs/csv/version_*/metrics.csv; do
    [ -f "$f" ] || continue
    run=${f#"$WORK"/}; study=${run%%/*}; run=${run#*/runs/}; cp "$f" "$RES/$study/metrics_${run%%/*}.csv"
  done
}

# REUSE=experiments/results/sparsity/summaries: runs with a committed summary are not run again (the base always is:
# the sweep needs its export). Studies are deterministic on one GPU type: a re-run reproduced every metric.
# RERUN="dense_finetune ramp75 ...": runs whose committed summaries are not reused (e.g. the references of new runs,
# which must start from the same, re-trained base).
if [ -n "${REUSE:-}" ]; then
  for f in "$REUSE"/summary_*.json; do
    run=$(basename "$f" .json); run=${run#summary_}
    case " dense_base ${RERUN:-} " in *" $run "*) ;; *) cp "$f" "$RES/sparsity/" ;; esac
  done
fi
# QUANT_REUSE="<folder> ...": the quantization runs with a summary in these folders are not run again (a run with a
# summary is skipped): the float fine-tunes and stacks an earlier call trained from the same base, which is
# deterministic on one GPU type, e.g. QUANT_REUSE=experiments/results/quantization/gpu_h200x2_run19.
for dir in ${QUANT_REUSE:-}; do
  compgen -G "$dir/summary_*.json" > /dev/null || { log "QUANT_REUSE: no summary_*.json in $dir"; exit 1; }
  cp "$dir"/summary_*.json "$RES/quantization/"
done
# The last two GPUs (of four or more) first serve the framework's own measurements: each 10-minute base recipe
# ($RECIPES) is sized by a throughput benchmark on its GPU, then trained; afterwards one GPU measures training
# throughput (the MFU table) and the other the plugins' training overhead, both otherwise idle. Until then the
# studies' runs avoid those GPUs (the file $RESERVED lists them).
RESERVED=$WORK/reserved_gpus
if [ "$GPUS" -ge 4 ]; then echo "$second_last $last" > "$RESERVED"; else rm -f "$RESERVED"; fi
STUDY_GPUS=(--gpus "$GPUS" --reserved_gpus "$RESERVED")

# Eager: 540 s of steps (a 470 s sizing ended the fifth run's fits in 466-477 s, start-up and validations included);
# compiled: 360 s (their fits took 534-558 s with compilation at a 420 s sizing; the seventh run's CUDA-graph fit,
# beside jobs on the other GPU, reached step 1675 after 289 s, slower than its benchmark's 16 steps/s). The fit also
# stops at 9 minutes (trainer.max_time; the CLI then validates the final weights) so a recipe that runs slow still ends inside the budget with its summary.
# name gpu batch lr [mode]: benchmark the recipe's step rate, then train for as many steps as fit $RECIPE_SECONDS
# of training (start-up, compilation and validation take the rest of the 10 minutes), cut at 600 s like the issue's
# budget. mode: compile (regional torch.compile) or cudagraphs (compiled, fixed shapes, CUDA graphs).
recipe() {
  local name=$1 gpu=$2 batch=$3 lr=$4 mode=${5:-} decay=${6:-} tokenizer=${7:-} multipliers=${8:-} variant=${9:-}
  local steps=${10:-${RECIPE_STEPS:-}} cfg extra
  # A mode whose benchmark fails falls back: cudagraphs -> compile -> eager (the log says which one trained).
  # RECIPE_STEPS=N trains N steps with no sizing benchmark (a recipe then fits one 10-minute job on its own).
  while :; do
    cfg=(--config experiments/pretrain/gpu_base.yaml --config experiments/csv_logger.yaml
         --data.init_args.batch_size="$batch" --model.init_args.lr="$lr" --data.init_args.num_workers=14)
    # variant "256px": experiments/pretrain/reading/256px.yaml stacked on the base config ("a+b": both, in order)
    local part
    for part in ${variant//+/ }; do cfg+=(--config "experiments/pretrain/reading/$part.yaml"); done
    # RECIPE_ARGS: more CLI arguments for every recipe, e.g. "--model.init_args.compile_dynamic=false"
    [ -n "${RECIPE_ARGS:-}" ] && read -r -a extra <<< "$RECIPE_ARGS" && cfg+=("${extra[@]}")
    [ -n "$decay" ] && cfg+=(--model.init_args.decay_fraction="$decay")
    # tokenizer "digits": framework/assets/tokenizer_digits.json (one token per digit)
    [ -n "$tokenizer" ] && cfg+=(--model.init_args.tokenizer="framework/assets/tokenizer_$tokenizer.json")
    # multipliers "vision_tower=3,multi_modal_projector=2": model.lr_multipliers
    [ -n "$multipliers" ] && cfg+=(--model.init_args.lr_multipliers="$($PY -c "import json,sys; print(json.dumps({k: float(v) for k, v in (p.split('=') for p in sys.argv[1].split(','))}))" "$multipliers")")
    case "$mode" in
      compile) cfg+=(--model.init_args.compile=true) ;;
      cudagraphs) cfg+=(--model.init_args.compile=true --model.init_args.compile_mode=reduce-overhead
                        --data.init_args.pad_to_max_length=true) ;;
    esac
    [ -n "$steps" ] && break
    CUDA_VISIBLE_DEVICES=$gpu $PY -m framework.cli bench "${cfg[@]}" --steps 40 --warmup 40 --plain \
      --new_tokens 16 --repeats 1 --out "$RES/gpu/bench_$name.json" > "$WORK/logs/bench_${name}_${mode:-eager}.log" 2>&1 \
      && break
    log "$name: benchmark in mode ${mode:-eager} failed"
    case "$mode" in cudagraphs) mode=compile ;; compile) mode= ;; *) break ;; esac
  done
  [ -n "$steps" ] || steps=$($PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(int(r['steps_per_s'] * float(sys.argv[2]) // 100 * 100))" \
          "$RES/gpu/bench_$name.json" "${RECIPE_SECONDS:-$([ -n "$mode" ] && echo 360 || echo 540)}" 2>/dev/null || echo 2000)
  log "$name: batch $batch lr $lr mode ${mode:-eager}, $steps steps"
  local start=$(date +%s)
  # -k: Lightning handles SIGTERM itself, and a run stuck in a CUDA call can outlive it; KILL follows 30 s later.
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 30 600 $PY -m framework.cli fit "${cfg[@]}" --trainer.max_steps="$steps" \
    --trainer.val_check_interval=$((steps / 4)) --trainer.check_val_every_n_epoch=null --trainer.max_time="${RECIPE_MAX_TIME:-00:00:09:00}" \
    --trainer.enable_progress_bar=false --checkpoint.dirpath="$WORK/ckpt/$name" \
    --trainer.logger.init_args.save_dir="$WORK/runs/$name" \
    --report.filename="$RES/gpu/summary_$name.json" > "$WORK/logs/$name.log" 2>&1
  log "$name rc=$? in $(( $(date +%s) - start )) s"
  cp "$WORK"/runs/"$name"/*/version_*/metrics.csv "$RES/gpu/metrics_$name.csv" 2>/dev/null || true
}
# entry gpu: one $RECIPES entry, batch:lr[:mode[:decay[:tokenizer[:multipliers[:variant[:steps]]]]]], run on that GPU.
recipe_entry() {
  local batch lr mode decay tokenizer multipliers variant steps
  IFS=: read -r batch lr mode decay tokenizer multipliers variant steps <<< "$1"
  recipe "recipe_b${batch}${mode:+_$mode}${decay:+_wsd$decay}${tokenizer:+_$tokenizer}${multipliers:+_lr${multipliers//[=,]/_}}${variant:+_$variant}" \
    "$2" "$batch" "$lr" "$mode" "$decay" "$tokenizer" "$multipliers" "$variant" "$steps"
}
# RECIPES only, one per GPU (0, 1, ... after RECIPE_GPU_OFFSET), side by side: `bash experiments/run_gpu_studies.sh recipes`.
if [ "${1:-}" = recipes ]; then
  read -r -a recipes <<< "${RECIPES:-256:8.0e-4 256:8.0e-4::0.3}"
  for i in "${!recipes[@]}"; do
    recipe_entry "${recipes[$i]}" "$((i + ${RECIPE_GPU_OFFSET:-0}))" &
  done
  wait
  log "recipes done"
  exit
fi
# The base every `reading*` mode starts from: experiments/pretrain/gpu_reading.yaml on GPU 0 for $BASE_STEPS steps
# with $BASE_WORKERS loader workers (the recipe is loader-bound), exported to $base; stops the script without one.
SP=(experiments/sparsity_study.py --out "$RES/sparsity" --work "$WORK/sparsity")
# The L0 runs' length on the base that reads ($L0_STEPS, default 1000); another length is also in their names
# (--run_tag <n>steps: l0_50_improved_3000steps), so runs of two lengths never share a summary or an export.
l0_length() {
  echo "--l0_steps ${L0_STEPS:-1000}"
  [ "${L0_STEPS:-1000}" = 1000 ] || echo "--run_tag ${L0_STEPS}steps"
}
base=$WORK/sparsity/exports/dense_base
# KEEP_BASE=1: a base exported by an earlier call in the same $WORK is used as it is (a follow-up call on one host).
reading_base() {
  if [ -n "${KEEP_BASE:-}" ] && [ -f "$base/config.json" ]; then log "reading base kept: $base"; return; fi
  log "reading base"
  $PY "${SP[@]}" base --only dense_base --base_steps "${BASE_STEPS:-3000}" --base_workers "${BASE_WORKERS:-28}" \
    --gpus 1 --base_args "--config experiments/pretrain/gpu_reading.yaml" > "$WORK/logs/base.log" 2>&1
  log "base rc=$?"
  [ -f "$base/config.json" ] || { log "no base export"; exit 1; }
}
# The studies on the base that reads (experiments/pretrain/gpu_reading.yaml): `bash experiments/run_gpu_studies.sh
# reading`. The base first (GPU 0, $BASE_STEPS steps, $BASE_WORKERS loader workers: the recipe is loader-bound),
# then at once: the sparsity goals' fine-tunes with a second seed, the one-shot references and the distillation-from-
# fine-tune ramps; L0 50% with its dense reference; the quantization table (W8A8, W4A8, W2A8 per channel), the 75% +
# 4-bit stack and QALFT. Each run takes the least busy GPU.
if [ "${1:-}" = reading ]; then
  reading_base
  $PY "${SP[@]}" sweep collect --only dense_finetune ramp50 ramp75 ramp2of4 ramp50_distill_ft ramp75_distill_ft \
    ramp2of4_distill_ft dense oneshot_mag_50 oneshot_act_50 oneshot_mag_75 oneshot_act_75 oneshot_mag_2of4 oneshot_act_2of4 --seeds 1 \
    --ft_steps "${FT_STEPS:-400}" --parallel "$((2 * GPUS))" --gpus "$GPUS" > "$WORK/logs/sparsity_study.log" 2>&1 &
  $PY "${SP[@]}" sweep --only l0_50_improved dense_finetune_l0 --ft_steps "${FT_STEPS:-400}" $(l0_length) \
    --parallel 2 --gpus "$GPUS" > "$WORK/logs/l0.log" 2>&1 &
  $PY experiments/quantization_study.py table stacked qalft collect --base_export "$base" --out "$RES/quantization" \
    --work "$WORK/quantization" --settings w8a8 w4a8 w2a8 --granularities ch --qat_steps "${FT_STEPS:-400}" \
    --lora_steps "${FT_STEPS:-400}" --parallel "$((2 * GPUS))" --gpus "$GPUS" > "$WORK/logs/quantization_study.log" 2>&1 &
  wait
  $PY "${SP[@]}" collect > /dev/null 2>&1
  log "reading studies done"
  exit
fi
# The goals' runs that fit one 10-minute call on a host of two GPUs (32 cores): `bash experiments/run_gpu_studies.sh
# reading_goals`. The base (GPU 0, 28 workers), then at once: the sparsity goals' fine-tunes (50%, 75%, 2:4 and their
# dense reference) with the one-shot references, and W2A8 per channel (PTQ, and QAT against a float fine-tune as
# long) with the 75% + W4A8 stack. Thirteenth run: 269 s for the base, 236 s for the rest, on two H200s.
if [ "${1:-}" = reading_goals ]; then
  reading_base
  $PY "${SP[@]}" sweep collect --only dense_finetune ramp50 ramp75 ramp2of4 dense oneshot_mag_50 oneshot_mag_75 \
    oneshot_act_75 oneshot_mag_2of4 oneshot_act_2of4 --ft_steps "${FT_STEPS:-400}" --parallel 5 --workers 4 \
    --gpus "$GPUS" > "$WORK/logs/sparsity_study.log" 2>&1 &
  $PY experiments/quantization_study.py table stacked collect --base_export "$base" --out "$RES/quantization" \
    --work "$WORK/quantization" --settings w2a8 --granularities ch --qat_steps "${QAT_STEPS:-300}" --parallel 2 \
    --workers 3 --gpus "$GPUS" > "$WORK/logs/quantization_study.log" 2>&1 &
  wait
  copy_run_metrics
  log "reading goals done"
  exit
fi
# What the goals' call leaves, sized for a second 10-minute call on two GPUs (not yet run): `bash
# experiments/run_gpu_studies.sh reading_rest`. The base again, then at once: L0 50% (improved) with its dense
# reference fine-tuned as long ($L0_STEPS, default 1000), and QALFT on both tasks against float LoRA then PTQ and
# QAT + PTQ, its QAT W4A8 export measured against the base (no float fine-tune in front: the chain base -> QAT ->
# LoRA -> PTQ is what has to fit).
# `reading_qalft`: the QALFT part alone, its runs with more loader workers each. LORA_FLOAT_BASE=float_finetune starts
# float LoRA from a float fine-tune as long as the QAT run (an earlier call's, when KEEP_BASE kept it);
# QLORA_BASES="bnb_nf4 bnb_int8" adds LoRA on bitsandbytes bases (needs bitsandbytes); QALFT_PARALLEL / QALFT_WORKERS.
if [ "${1:-}" = reading_rest ] || [ "${1:-}" = reading_qalft ]; then
  reading_base
  if [ "$1" = reading_rest ]; then
    $PY "${SP[@]}" sweep collect --only l0_50_improved dense_finetune_l0 --ft_steps "${FT_STEPS:-400}" \
      $(l0_length) --parallel 2 --workers 4 --gpus "$GPUS" > "$WORK/logs/l0.log" 2>&1 &
  fi
  read -r -a qlora <<< "${QLORA_BASES:-}"
  $PY experiments/quantization_study.py qalft collect --base_export "$base" --out "$RES/quantization" \
    --work "$WORK/quantization" --qat_reference base --qat_steps "${QAT_STEPS:-300}" --lora_steps "${LORA_STEPS:-300}" \
    --lora_float_base "${LORA_FLOAT_BASE:-base}" --qlora_bases "${qlora[@]}" \
    --parallel "${QALFT_PARALLEL:-4}" --workers "$([ "$1" = reading_rest ] && echo 3 || echo "${QALFT_WORKERS:-6}")" \
    --gpus "$GPUS" > "$WORK/logs/quantization_study.log" 2>&1 &
  wait
  copy_run_metrics
  log "reading rest done"
  exit
fi
# L0's references on the base that reads: `bash experiments/run_gpu_studies.sh reading_l0`. The base (or, with
# KEEP_BASE=1, an earlier call's), then at once: plain L0 at 50%, the pruned shape from scratch with the L0 run's
# compute (trained like the base: its recipe file), improved L0 distilled from the base, and the dense reference
# fine-tuned as long ($L0_STEPS, default 1000, exported); then improved L0 distilled from that reference. L0_RUNS picks
# runs (e.g. l0_50_improved_keep_hidden), L0_WORKERS each run's loader workers (default 6). Fifteenth run, two
# H200s: 277 s for the base, 206 s for the first four. Runs of another length than 1000 steps carry it in their
# names (L0_STEPS=3000: l0_50_improved_3000steps, its reference dense_finetune_l0_3000steps); L0_RUNS names them
# with or without it.
l0_study() {
  local runs
  read -r -a runs <<< "${L0_RUNS:-dense_finetune_l0 l0_50_plain l0_scratch50_l0compute l0_50_improved_distill l0_50_improved_distill_ft}"
  $PY "${SP[@]}" sweep collect --only "${runs[@]}" --ft_steps "${FT_STEPS:-400}" $(l0_length) --parallel 4 \
    --workers "${L0_WORKERS:-6}" --gpus "$GPUS" --base_args "--config experiments/pretrain/gpu_reading.yaml" \
    > "$WORK/logs/l0.log" 2>&1
  log "l0 rc=$?"
}
if [ "${1:-}" = reading_l0 ]; then
  reading_base
  l0_study
  copy_run_metrics
  exit
fi
# The 75% + W4A8 stack over the whole model (every Linear and the token table, with and without pruning the head)
# beside the language-model-only stack, against a float fine-tune as long: `bash experiments/run_gpu_studies.sh
# reading_stack`. Sized for one 10-minute call on two GPUs (the base, then the float fine-tune, then three runs).
# STACK_SCOPES picks the runs (quantization_study.py --stack_scopes), STACK_DISTILL=1 adds distillation from the base,
# QAT_STEPS and QAT_LR set their length and learning rate (and the float fine-tune's, trained the same way), e.g.
# STACK_SCOPES=whole_dense_head QAT_STEPS=1000 QAT_LR=2e-4 STACK_DISTILL=1. QAT_REFERENCE=base
# measures agreement against the base and skips the float fine-tune (its numbers are known from an earlier call);
# STACK_TEACHER=float_finetune distils from that fine-tune instead of the base (it then trains first);
# STACK_FEATURE_WEIGHT=1 adds layer-wise distillation (the hidden states) to it; STACK_RAMP_END (default 0.7) is where
# the ramps end, as a share of the run (the rest recovers at the final sparsity); STACK_ABITS=16 quantizes activations
# to 16 bits instead of 8 (W4A16, named _qat_w4a16). STACK_SEEDS="1" adds seed
# replicas of each run, each beside a float fine-tune of its seed; all run at once. Runs of another length or rate
# than 300 steps at 1e-4 (and their float fine-tune) carry both in their names, e.g. _1000steps_lr2e-4.
stack_study() {
  local scopes seeds tag=""
  read -r -a scopes <<< "${STACK_SCOPES:-language_model whole whole_dense_head}"
  read -r -a seeds <<< "${STACK_SEEDS:-}"
  if [ "${QAT_STEPS:-300}" != 300 ] || [ "${QAT_LR:-1e-4}" != 1e-4 ]; then tag="${QAT_STEPS:-300}steps_lr${QAT_LR:-1e-4}"; fi
  $PY experiments/quantization_study.py stacked collect --base_export "$base" --out "$RES/quantization" \
    --work "$WORK/quantization" --stack_scopes "${scopes[@]}" --qat_steps "${QAT_STEPS:-300}" \
    --qat_lr "${QAT_LR:-1e-4}" --qat_reference "${QAT_REFERENCE:-float_finetune}" --stack_ramp_end "${STACK_RAMP_END:-0.7}" \
    --stack_activation_bits "${STACK_ABITS:-8}" \
    ${STACK_DISTILL:+--stack_distill --stack_teacher "${STACK_TEACHER:-base}" \
      --stack_feature_weight "${STACK_FEATURE_WEIGHT:-0}"} ${STACK_SEEDS:+--stack_seeds "${seeds[@]}"} ${tag:+--run_tag "$tag"} \
    --parallel "$(( ${#scopes[@]} * (1 + ${#seeds[@]}) + ${#seeds[@]} ))" \
    --workers "${STACK_WORKERS:-8}" --gpus "$GPUS" > "$WORK/logs/quantization_study.log" 2>&1
  log "stack rc=$?"
}
if [ "${1:-}" = reading_stack ]; then
  reading_base
  stack_study
  copy_run_metrics
  exit
fi
# Both on one base, side by side (sized for one GPU of 16 cores: the sixteenth run): `bash
# experiments/run_gpu_studies.sh reading_l0_stack`, with the variables of both modes, e.g. L0_RUNS=... L0_WORKERS=7
# STACK_SCOPES=whole_vision50_text80 STACK_WORKERS=7 QAT_REFERENCE=base.
if [ "${1:-}" = reading_l0_stack ]; then
  reading_base
  l0_study &
  stack_study &
  wait
  copy_run_metrics
  exit
fi
log "sparsity study: base, sweep, latency"
$PY experiments/sparsity_study.py base sweep latency collect --out "$RES/sparsity" --work "$WORK/sparsity" \
  --base_steps 2000 --ft_steps 500 --l0_steps 1200 --parallel "${SPARSITY_PARALLEL:-$GPUS}" "${STUDY_GPUS[@]}" \
  > "$WORK/logs/sparsity_study.log" 2>&1 &
sparsity=$!

release() {  # gpu: the studies may use it again
  [ -f "$RESERVED" ] && echo "$(tr ' ' '\n' < "$RESERVED" | grep -vx "$1" | tr '\n' ' ')" > "$RESERVED.tmp" && mv "$RESERVED.tmp" "$RESERVED"
  log "gpu $1 released"
}
if [ "$GPUS" -ge 4 ]; then
  # Batch 512 and 1024 (2026-11-27) did not start reading sooner: reading needs optimizer steps, so the next
  # recipes buy steps per second (CUDA graphs) at the batch that worked and at half of it.
  read -r -a recipes <<< "${RECIPES:-256:8.0e-4:cudagraphs 128:6.0e-4:cudagraphs}"  # batch:lr[:mode[:decay[:tokenizer[:multipliers[:variant[:steps]]]]]]
  (
    recipe_entry "${recipes[0]}" "$second_last"
    CUDA_VISIBLE_DEVICES=$second_last OUT=$RES/gpu BATCHES="128 256" bash experiments/run_gpu_results.sh bench > "$WORK/logs/throughput.log" 2>&1
    log "throughput rc=$?"
    release "$second_last"
  ) &
  (
    if [ ${#recipes[@]} -gt 1 ]; then
      recipe_entry "${recipes[1]}" "$last"
    fi
    CUDA_VISIBLE_DEVICES=$last $PY experiments/plugin_overhead.py --out "$RES/sparsity/overhead.json" \
      > "$WORK/logs/overhead_sparsity.log" 2>&1
    log "sparsity overhead rc=$?"
    while [ ! -f "$WORK/quantization/exports/float_finetune/config.json" ]; do sleep 10; done
    CUDA_VISIBLE_DEVICES=$last $PY experiments/quantization_study.py overhead --base_export "$base" \
      --out "$RES/quantization" --work "$WORK/quantization" > "$WORK/logs/overhead_quantization.log" 2>&1
    log "quantization overhead rc=$?"
    CUDA_VISIBLE_DEVICES=$last $PY -m plugins.quantization.bench --out "$RES/quantization/bench_fake_quant.json" \
      > "$WORK/logs/bench_fake_quant.log" 2>&1
    release "$last"
  ) &
fi

while [ ! -f "$base/config.json" ]; do
  kill -0 $sparsity 2>/dev/null || { log "sparsity study ended before the base was exported"; break; }
  sleep 10
done
if [ -f "$base/config.json" ]; then
  log "quantization study from $base"
  # shellcheck disable=SC2086  # QUANT_STAGES is a list of stage names
  $PY experiments/quantization_study.py ${QUANT_STAGES:-table runtime mixed qalft stacked collect} --base_export "$base" \
    --out "$RES/quantization" --work "$WORK/quantization" --qat_steps 500 --lora_steps 400 \
    --parallel "${QUANTIZATION_PARALLEL:-$GPUS}" "${STUDY_GPUS[@]}" > "$WORK/logs/quantization_study.log" 2>&1
  log "quantization study rc=$?"
fi
wait $sparsity; log "sparsity study rc=$?"
wait
if [ "$GPUS" -lt 4 ]; then  # one or two GPUs: the measurements that need an idle GPU come last
  CUDA_VISIBLE_DEVICES=0 $PY experiments/plugin_overhead.py --out "$RES/sparsity/overhead.json" \
    > "$WORK/logs/overhead_sparsity.log" 2>&1
  [ -f "$base/config.json" ] && CUDA_VISIBLE_DEVICES=0 $PY experiments/quantization_study.py overhead \
    --base_export "$base" --out "$RES/quantization" --work "$WORK/quantization" > "$WORK/logs/overhead_quantization.log" 2>&1
fi
log "all done"
