#!/usr/bin/env bash
# The GPU benchmark grid: one prepared run of at most ~8 minutes on one H100/H200.
#
#   OUT=/some/dir bash benchmarks/gpu.sh              # on the GPU machine (diffusers etc. on PYTHONPATH)
#   GPU_SH_DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu.sh   # the same script path on tiny models on the CPU
#   GPU_SH_ONLY='sd35m|fluxdev' ...                      # only the configs whose name matches (grep -E)
#   GPU_SH_PREDICT=0 ...                                 # without the planner's predictions
#
# SD 1.5 and SDXL are full-size architectures with random weights, built in memory. SD3.5 and FLUX.1 are the
# real pipelines from local diffusers directories under $GPU_SH_MODELS (default /models: stable-diffusion-3.5-
# medium, stable-diffusion-3.5-large-turbo, FLUX.1-dev, and for the 2026 families Z-Image-Turbo, FLUX.2-klein-4B,
# Qwen-Image, FLUX.2-dev; the device has no network), with random ViT-H-14 reward
# towers; a config whose directory is absent is recorded as failed and the grid goes on.
#
# Each config runs in its own python process under its own timeout; a failure (OOM, timeout, error) is
# recorded and the grid goes on. Results are rewritten after every config ($OUT/gpu_results.{json,md}),
# so a kill at any point leaves what finished. Planner predictions are computed on the CPU in a
# background process meanwhile and joined to the measurements by config name.
set -u

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
export PYTHONPATH="${PYTHONPATH:-}:$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/benchmarks/results/gpu_run}"
DRY="${GPU_SH_DRY_RUN:-0}"
BUDGET="${GPU_SH_BUDGET_S:-440}"     # seconds for the whole grid (the lease also pays the start)
MODELS="${GPU_SH_MODELS:-/models}"
ONLY="${GPU_SH_ONLY:-.}"
PREDICT="${GPU_SH_PREDICT:-1}"
mkdir -p "$OUT"
REC="$OUT/gpu_records.jsonl"
PRED="$OUT/gpu_predictions.jsonl"
LOG="$OUT/log.txt"
START=$(date +%s)

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

report() {
  "$PY" "$HERE/report.py" "$REC" "$PRED" --json "$OUT/gpu_results.json" --md "$OUT/gpu_results.md" \
    --title "rewardtune GPU benchmarks$([ "$DRY" = 1 ] && echo ' (DRY RUN: tiny models on the CPU)')" >>"$LOG" 2>&1 \
    || log "report failed"
}

# In a dry run, full-size architectures and model directories become tiny pipelines of their family (SD3.5:
# sd3, FLUX.1-dev: flux, FLUX.1-schnell: flux-schnell), 64 px, 4 sampling steps (K <= 4), one timed step, no
# quantized base (bitsandbytes needs CUDA) and the planner on the tiny pipeline: the same script path and
# flags otherwise, fast enough for a loaded CPU.
translate() {
  local out=() prev="" skip=0
  for a in "$@"; do
    local orig="$a"
    if [ "$skip" = 1 ]; then skip=0; prev="$orig"; continue; fi
    if [ "$DRY" = 1 ]; then
      if [ "$prev" = "--arch" ]; then a=$([ "$a" = sd15 ] && echo sd || echo sdxl); fi
      if [ "$prev" = "--model" ]; then
        case "$a" in
          *FLUX.1-schnell*) a=flux-schnell ;;
          *Z-Image*|*Qwen-Image*|*FLUX.2*|*Wan*) a=flux ;;  # the dry run checks the script path, not these families
          *FLUX*) a=flux ;;
          *) a=sd3 ;;
        esac
      fi
      if [ "$prev" = "--resolution" ]; then a=64; fi
      if [ "$prev" = "--sample-steps" ]; then a=4; fi
      if [ "$prev" = "--k" ] && [ "$a" -gt 4 ]; then a=4; fi
      if [ "$prev" = "--timed" ]; then a=1; fi
      if [ "$prev" = "--quantize-base" ]; then a=none; fi
      if [ "$a" = "--arch" ] || [ "$a" = "--model" ]; then a="--tiny"; fi
      if [ "$a" = "--plan-model" ] || [ "$a" = "--defaults-from" ]; then skip=1; prev="$orig"; continue; fi
      # the dry run's tiny models are image models: Wan's video options go with their values
      if [ "$a" = "--num-frames" ] || [ "$a" = "--frames" ] || [ "$a" = "--lora-on" ]; then
        skip=1; prev="$orig"; continue
      fi
    fi
    out+=("$a"); prev="$orig"
  done
  printf '%s\n' "${out[@]}"
}

# missing_weights ARGS...: the --model directory named in ARGS when it is absent (real runs only).
missing_weights() {
  local prev=""
  for a in "$@"; do
    if [ "$prev" = "--model" ] && [ "$DRY" != 1 ] && [ ! -f "$a/model_index.json" ]; then echo "$a"; return; fi
    prev="$a"
  done
}

# ft NAME TIMEOUT_S ARGS...: one fine-tuning config in its own process.
ft() {
  local name="$1" limit="$2"; shift 2
  local rem; rem=$(left)
  if [ "$rem" -lt 25 ]; then log "SKIP $name (budget spent)"; return; fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  local absent; absent=$(missing_weights "$@")
  if [ -n "$absent" ]; then
    log "FAILED $name: no diffusers model at $absent (copy its weights there or set GPU_SH_MODELS)"
    echo "{\"name\": \"$name\", \"error\": \"weights absent: no model_index.json in $absent\", \"source\": \"$absent\"}" >>"$REC"
    report
    return
  fi
  mapfile -t args < <(translate "$@")
  log "RUN $name (limit ${limit}s): ${args[*]}"
  timeout -k 10 "$limit" "$PY" "$HERE/finetune_step.py" --name "$name" --record "$REC" --no-predict "${args[@]}" >>"$LOG" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    log "FAILED $name rc=$rc"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      echo "{\"name\": \"$name\", \"error\": \"timeout after ${limit}s (rc $rc)\", \"source\": \"timeout\"}" >>"$REC"
    fi
  fi
  report
}

# rw NAME TIMEOUT_S ARGS...: one reward benchmark in its own process.
rw() {
  local name="$1" limit="$2"; shift 2
  echo "$name" | grep -Eq "$ONLY" || return 0
  local rem; rem=$(left)
  if [ "$rem" -lt 25 ]; then log "SKIP $name (budget spent)"; return; fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  local extra=(); [ "$DRY" = 1 ] && extra=(--tiny --image-size 64)
  log "RUN $name (limit ${limit}s): $* ${extra[*]}"
  timeout -k 10 "$limit" "$PY" "$HERE/reward_bench.py" --name "$name" --record "$REC" "$@" "${extra[@]}" >>"$LOG" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    log "FAILED $name rc=$rc"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      echo "{\"kind\": \"reward\", \"name\": \"$name\", \"error\": \"timeout after ${limit}s (rc $rc)\"}" >>"$REC"
    fi
  fi
  report
}

# dist NAME TIMEOUT_S ACCELERATE_CONFIG: a sharded training path on one GPU (it proves the path, not the memory):
# two fine-tuning steps of the bundled demo pipeline with its ICT reward through `accelerate launch` with that
# recipe. Recorded ok/failed with the processes and the distributed type the run reports.
dist() {
  local name="$1" limit="$2" config="$3"
  echo "$name" | grep -Eq "$ONLY" || return 0
  local rem; rem=$(left)
  if [ "$rem" -lt 25 ]; then log "SKIP $name (budget spent)"; return; fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  local work; work=$(mktemp -d /tmp/gpu_sh_dist.XXXXXX)  # outside $OUT, which holds few files
  local demo="$ROOT/rewardtune/demo/models"
  log "RUN $name (limit ${limit}s): accelerate launch --config_file $config --num_processes 1 ... finetune"
  timeout -k 10 "$limit" "$PY" -m accelerate.commands.launch --config_file "$ROOT/$config" --num_processes 1 \
    -m rewardtune.cli finetune --model "$demo/pipeline" --reward ict --ict "$demo/ict" --output "$work/run" \
    --steps 2 --k 2 --sample-steps 4 --batch-size 1 --eval-size 2 --mixed-precision bf16 --checkpoint-every 1 \
    >>"$LOG" 2>&1
  local rc=$?
  "$PY" - "$name" "$rc" "$config" "$work/run/summary.json" >>"$REC" 2>>"$LOG" <<'PYEOF'
import json, sys
from pathlib import Path
name, rc, config, summary = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
rec = {"kind": "distributed", "name": name, "accelerate_config": config, "rc": rc}
if summary.is_file():
    s = json.loads(summary.read_text())
    rec.update(processes=s.get("processes"), steps=s.get("steps"))
if rc != 0:
    rec["error"] = f"exit {rc}"
print(json.dumps(rec))
PYEOF
  [ $rc -ne 0 ] && log "FAILED $name rc=$rc"
  rm -rf "$work"
  report
}

# The configs, most important first: name, then finetune flags (see finetune_step.py --help). The issue's
# order: SD 1.5 and SDXL at K=1, the flow models at 1024 px (SD3.5-Medium, SD3.5-Large-Turbo at K=2, FLUX.1-dev
# with an NF4 base, the 2026 families (Z-Image-Turbo in bf16, FLUX.2-klein-4B, Qwen-Image and FLUX.2-dev with NF4
# bases, the last two with --reward-offload as their recipes: its cost is in the reward part's time), Wan2.1-1.3B and
# Wan2.2-TI2V-5B at their recipes' 480x832 and 33 frames (ICT-HP on 4), FLUX.1-dev with its bf16 base, Wan2.2-TI2V-5B
# at 704x1280, the Wan2.2-A14B pair with both experts in NF4 (one GPU; its recipe wan22_a14b_icthp_draftk_nf4)),
# then K = all steps, then the rest.
COMMON="--method draft-k --lora-rank 16 --lora-alpha 16 --reward icthp --mixed-precision bf16 --batch-size 1 --attention sdpa"
MAIN="$COMMON --sample-steps 30"
FLOW="$COMMON --random-reward --resolution 1024 --gradient-checkpointing --warmup 1 --timed 2"
CONFIGS=(
  "sdxl-1024-k1-ckpt|150|--arch sdxl --resolution 1024 --k 1 --gradient-checkpointing $MAIN --warmup 1 --timed 3"
  "sd15-512-k1-ckpt|90|--arch sd15 --resolution 512 --k 1 --gradient-checkpointing $MAIN --warmup 1 --timed 3"
  "sd35m-1024-k1-ckpt|180|--model $MODELS/stable-diffusion-3.5-medium --plan-model sd35-medium --k 1 --sample-steps 28 $FLOW"
  "sd35l-turbo-1024-k2-ckpt|240|--model $MODELS/stable-diffusion-3.5-large-turbo --plan-model sd35-large-turbo --defaults-from sd35-large-turbo --k 2 --sample-steps 4 --guidance-scale 0 $FLOW"
  "fluxdev-1024-k1-ckpt-nf4|300|--model $MODELS/FLUX.1-dev --plan-model flux-dev --quantize-base nf4 --k 1 --sample-steps 28 $FLOW"
  "zimage-turbo-1024-k1-ckpt|180|--model $MODELS/Z-Image-Turbo --plan-model z-image-turbo --defaults-from z-image-turbo --k 1 --sample-steps 9 $FLOW"
  "flux2-klein4b-1024-k1-ckpt-nf4|180|--model $MODELS/FLUX.2-klein-4B --plan-model flux2-klein-4b --defaults-from flux2-klein-4b --quantize-base nf4 --k 1 --sample-steps 4 $FLOW"
  "qwenimage-1024-k1-ckpt-nf4|300|--model $MODELS/Qwen-Image --plan-model qwen-image --quantize-base nf4 --reward-offload --k 1 --sample-steps 50 --max-sequence-length 128 $FLOW"
  "flux2dev-1024-k1-ckpt-nf4|300|--model $MODELS/FLUX.2-dev --plan-model flux2-dev --quantize-base nf4 --reward-offload --k 1 --sample-steps 50 $FLOW"
  "wan21-1.3b-480x832-f33-k1-ckpt|300|--model $MODELS/Wan2.1-T2V-1.3B-Diffusers --plan-model wan21-t2v-1.3b --defaults-from wan21-t2v-1.3b --reward-offload --k 1 --sample-steps 50 $FLOW --resolution 480x832 --num-frames 33 --frames 4"
  "wan22-5b-480x832-f33-k1-ckpt|300|--model $MODELS/Wan2.2-TI2V-5B-Diffusers --plan-model wan22-ti2v-5b --defaults-from wan22-ti2v-5b --reward-offload --k 1 --sample-steps 50 $FLOW --resolution 480x832 --num-frames 33 --frames 4"
  "fluxdev-1024-k1-ckpt-bf16|240|--model $MODELS/FLUX.1-dev --plan-model flux-dev --k 1 --sample-steps 28 $FLOW"
  "wan22-5b-704x1280-f33-k1-ckpt|360|--model $MODELS/Wan2.2-TI2V-5B-Diffusers --plan-model wan22-ti2v-5b --defaults-from wan22-ti2v-5b --k 1 --sample-steps 50 $FLOW --resolution 704x1280 --num-frames 33 --frames 4"
  "wan22-a14b-480x832-f5-k1-ckpt-nf4|420|--model $MODELS/Wan2.2-T2V-A14B-Diffusers --plan-model wan22-t2v-a14b --defaults-from wan22-t2v-a14b --quantize-base nf4 --lora-on low --reward-offload --k 1 --sample-steps 40 $FLOW --resolution 480x832 --num-frames 5 --frames 4"
  "sd15-512-k30-ckpt|90|--arch sd15 --resolution 512 --k 30 --gradient-checkpointing $MAIN --warmup 1 --timed 2"
  "sd15-512-k1-nockpt|60|--arch sd15 --resolution 512 --k 1 --no-gradient-checkpointing $MAIN --warmup 1 --timed 2"
  "sdxl-1024-k4-ckpt|100|--arch sdxl --resolution 1024 --k 4 --gradient-checkpointing $MAIN --warmup 1 --timed 2"
  "sdxl-1024-k1-nockpt|90|--arch sdxl --resolution 1024 --k 1 --no-gradient-checkpointing $MAIN --warmup 1 --timed 2"
  "sd15-512-k1-ckpt-bs2|60|--arch sd15 --resolution 512 --k 1 --gradient-checkpointing $MAIN --batch-size 2 --warmup 1 --timed 2"
  "sdxl-1024-k1-ckpt-vaefp32|90|--arch sdxl --resolution 1024 --k 1 --gradient-checkpointing --vae-fp32 $MAIN --warmup 1 --timed 2"
)

log "gpu.sh start (dry run: $DRY, budget ${BUDGET}s, out $OUT)"
"$PY" - >>"$LOG" 2>&1 <<'EOF' || true
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
for m in ("diffusers", "transformers", "peft", "accelerate", "open_clip"):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:
        print(m, "MISSING", e)
EOF

# Planner predictions in the background, on a few CPU threads, while the GPU measures. The running
# planner's pid is kept outside $OUT (which may hold 8 files at most) so the end can stop it.
PRED_PIDFILE="$(mktemp /tmp/gpu_sh_pred.XXXXXX)"
(
  for entry in "${CONFIGS[@]}"; do
    [ "$PREDICT" = 1 ] || break
    IFS='|' read -r name _ flags <<<"$entry"
    echo "$name" | grep -Eq "$ONLY" || continue
    # shellcheck disable=SC2086
    mapfile -t args < <(translate $flags)
    OMP_NUM_THREADS=4 timeout 240 nice -n 10 "$PY" "$HERE/finetune_step.py" --predict-only --name "$name" \
      --record "$PRED" "${args[@]}" &
    echo $! >"$PRED_PIDFILE"
    wait $!
  done
) >>"$OUT/predict_log.txt" 2>&1 &
PRED_PID=$!

i=0
for entry in "${CONFIGS[@]}"; do
  IFS='|' read -r name limit flags <<<"$entry"
  echo "$name" | grep -Eq "$ONLY" || continue
  # shellcheck disable=SC2086
  ft "$name" "$limit" $flags
  i=$((i + 1))
  if [ $i -eq 2 ]; then  # reward figures after the two headline configs
    rw "score-icthp-bs16" 60 --task score --reward icthp --batch-size 16 --precision bf16
    rw "train-ict-bs8-ckpt" 90 --task train-ict --batch-size 8 --precision bf16 --checkpointing
  fi
done
rw "train-hp-bs8-ckpt" 90 --task train-hp --batch-size 8 --precision bf16 --checkpointing
# Last: the sharded paths (issue #14). DeepSpeed needs its wheel carried (pip install deepspeed).
dist "fsdp2-demo-2steps" 120 recipes/accelerate/fsdp.yaml
dist "zero2-demo-2steps" 120 recipes/accelerate/deepspeed_zero2.yaml

# Give the background planner what budget is left, then stop it.
while kill -0 "$PRED_PID" 2>/dev/null && [ "$(left)" -gt 5 ]; do sleep 2; done
if kill -0 "$PRED_PID" 2>/dev/null; then
  log "stopping the background planner (budget spent)"
  kill "$PRED_PID" "$(cat "$PRED_PIDFILE")" 2>/dev/null
fi
rm -f "$PRED_PIDFILE"
report
log "gpu.sh done: $OUT/gpu_results.md"
exit 0
