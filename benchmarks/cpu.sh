#!/usr/bin/env bash
# The CPU grid on tiny pipelines (what benchmarks/results/cpu_tiny.* hold):
#   bash benchmarks/cpu.sh            # writes benchmarks/results/cpu_tiny.{json,md}
# One process per config (peak RSS is per process). Targets: the whole step within 1.15x of the sum of
# its parts; with checkpointing, peak memory grows by less than 10 % from K=1 to K=all steps.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# One thread: tiny models gain nothing from more, and on a shared CPU OpenMP threads spin while their
# partner is descheduled, which makes both wall and CPU seconds noisy.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
HERE="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="${PYTHONPATH:-}:$(dirname "$HERE")"
PY="${PYTHON:-python3}"
OUT="${OUT:-$HERE/results}"
TIMED="${CPU_SH_TIMED:-5}"
mkdir -p "$OUT"
REC="$OUT/cpu_tiny_records.jsonl"
: >"$REC"
COMMON="--mixed-precision bf16 --sample-steps 10 --lora-rank 4 --reward icthp --warmup 1 --timed $TIMED --track-tensors"
run() {
  local name="$1"; shift
  echo "RUN $name: $*"
  # shellcheck disable=SC2086
  timeout 900 "$PY" "$HERE/finetune_step.py" --name "$name" --record "$REC" "$@" $COMMON || echo "FAILED $name"
}
run tiny-sd-k1-ckpt --tiny sd --k 1 --gradient-checkpointing
run tiny-sd-k10-ckpt --tiny sd --k 10 --gradient-checkpointing
run tiny-sd-k1-nockpt --tiny sd --k 1 --no-gradient-checkpointing
run tiny-sd-k10-nockpt --tiny sd --k 10 --no-gradient-checkpointing
run tiny-sdxl-k1-ckpt --tiny sdxl --k 1 --gradient-checkpointing
run tiny-sdxl-k10-ckpt --tiny sdxl --k 10 --gradient-checkpointing
for task in "--task score --reward icthp --image-size 256" "--task train-ict --checkpointing" "--task train-hp --checkpointing"; do
  # shellcheck disable=SC2086
  timeout 600 "$PY" "$HERE/reward_bench.py" --tiny --batch-size 8 --timed "$TIMED" --record "$REC" $task || echo "FAILED reward $task"
done
"$PY" "$HERE/report.py" "$REC" --json "$OUT/cpu_tiny.json" --md "$OUT/cpu_tiny.md" \
  --title "rewardtune CPU benchmarks (tiny pipelines and tiny reward towers)"
