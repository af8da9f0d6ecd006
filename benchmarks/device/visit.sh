#!/usr/bin/env bash
# One device call: set up (idempotent), run the named stages within a time budget, export the store.
# usage: [STAGE_MIN_S=30] benchmarks/device/visit.sh SECONDS STAGE [STAGE ...]
budget=$1; shift
start=$(date +%s)
. benchmarks/device/setup.sh > "$OUT/setup.log" 2>&1
grep -A9 "^packages" "$OUT/setup.log" | grep -v "^model"   # a missing wheel shows before any stage runs
for stage in "$@"; do
  left=$(( budget - ($(date +%s) - start) ))
  # STAGE_MIN_S: start no stage with less left (a stage that cannot finish only burns device time)
  [ "$left" -lt "${STAGE_MIN_S:-30}" ] && { echo "no time left for $stage ($left s < ${STAGE_MIN_S:-30} s)"; break; }
  echo "##### stage $stage ($left s left)"
  timeout "$left" benchmarks/device/stage.sh "$stage" 2>&1 | tee -a "$OUT/stages.log" | grep -E "^===|done in|finished|FAILED|Error|error|skipped" | cut -c1-300
done
MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file://$STATE/mlruns python3 benchmarks/device/export_runs.py "$OUT/runs.csv"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
ls $STATE/chunks $STATE/cache/wheels > "$OUT/state.txt" 2>&1; true
