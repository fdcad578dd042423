#!/usr/bin/env bash
# Trains the shadow-model campaign of every dataset.
#
# Run this same line on every GPU machine that sees the same LOG_DIR (a shared filesystem): the
# workers share the runs out through the file-lock work queue in each logdir, so more machines
# simply finish sooner. A worker with nothing left to claim waits while others train and takes over
# the runs of workers that die, so the campaign finishes; re-running the line never redoes a finished
# run. Worker logs ($LOG_DIR/<dataset>/worker_logs/) are appended to; a failed worker's last error
# line is printed.
#
#   bash scripts/train_all.sh
#   WORKERS_PER_GPU=2 DATASETS="fitzpatrick chexpert" DATA_DIR=/data LOG_DIR=/shared/logs bash scripts/train_all.sh
#   bash scripts/train_all.sh --epochs=10            # extra flags go to every worker
#
# Settings (environment variables):
#   DATASETS         datasets in order (default: fitzpatrick fairvision embed chexpert mimic)
#   DATA_DIR         holds one folder per dataset: $DATA_DIR/<dataset> is its --data_root (./data)
#   LOG_DIR          $LOG_DIR/<dataset> is its --logdir (./logs)
#   N_RUNS           shadow models per dataset (default: the scripts' --n_runs, 200 as in the paper)
#   WORKERS_PER_GPU  worker processes per visible GPU (1); small models train faster with 2–4
#   GPUS             GPU indices to use (default: $CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi
#                    lists, else none: WORKERS_PER_GPU workers on the CPU)
#   PYTHON           interpreter (python)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/worker_log.sh

PYTHON=${PYTHON:-python}
DATASETS=${DATASETS:-"fitzpatrick fairvision embed chexpert mimic"}
DATA_DIR=${DATA_DIR:-./data}
LOG_DIR=${LOG_DIR:-./logs}
n_runs_flag=()
if [ -n "${N_RUNS:-}" ]; then
  n_runs_flag=(--n_runs="$N_RUNS")
fi
WORKERS_PER_GPU=${WORKERS_PER_GPU:-1}

if [ -z "${GPUS+x}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    GPUS=${CUDA_VISIBLE_DEVICES//,/ }
  elif command -v nvidia-smi >/dev/null 2>&1; then
    GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ')
  else
    GPUS=""
  fi
fi
read -r -a gpu_list <<< "$GPUS"
if [ "${#gpu_list[@]}" -eq 0 ]; then
  gpu_list=("cpu")
fi

# Background workers of a non-interactive shell ignore Ctrl-C: forward it (and SIGTERM) to them as
# SIGTERM, on which each gives its claimed run back to the queue and exits.
pids=()
stop_workers() {
  trap - INT TERM
  [ "${#pids[@]}" -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null
  wait
  exit 130
}
trap stop_workers INT TERM

failed=0
for dataset in $DATASETS; do
  logdir="$LOG_DIR/$dataset"
  mkdir -p "$logdir/worker_logs"
  echo "== $dataset: ${#gpu_list[@]} device(s) x $WORKERS_PER_GPU worker(s), logdir $logdir"
  pids=()
  logs=()
  offsets=()
  for gpu in "${gpu_list[@]}"; do
    for ((w = 0; w < WORKERS_PER_GPU; w++)); do
      log="$logdir/worker_logs/$(hostname)-$gpu-$w.log"
      offsets+=("$(worker_log_start "$log")")
      logs+=("$log")
      if [ "$gpu" = "cpu" ]; then
        device_env=(env JAX_PLATFORMS=cpu)
      else
        # each worker sees one GPU; --workers_per_device gives each its share of the GPU's memory
        device_env=(env CUDA_VISIBLE_DEVICES="$gpu")
      fi
      "${device_env[@]}" "$PYTHON" "$dataset.py" --data_root="$DATA_DIR/$dataset" --logdir="$logdir" \
        "${n_runs_flag[@]}" --workers_per_device="$WORKERS_PER_GPU" "$@" >>"$log" 2>&1 &
      pids+=("$!")
    done
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      echo "   a $dataset worker failed (pid ${pids[$i]}): $(worker_last_error "${logs[$i]}" "${offsets[$i]}")" >&2
      echo "   its log: ${logs[$i]}" >&2
      failed=1
    fi
  done
  grep -h "nothing left to claim" "$logdir"/worker_logs/"$(hostname)"-*.log 2>/dev/null | tail -n 1
done
exit "$failed"
