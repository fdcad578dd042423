#!/usr/bin/env bash
# Attacks, aggregates and plots every trained campaign (after scripts/train_all.sh).
#
#   bash scripts/plot_all.sh
#   DATASETS="fitzpatrick" LOG_DIR=/shared/logs bash scripts/plot_all.sh --extra_flag=…
#
# Settings: DATASETS (default: every dataset), LOG_DIR (./logs), DATA_DIR (./data: when
# $DATA_DIR/<dataset> exists it is passed as --data_root, for the grid of most vulnerable images),
# PYTHON (python). A dataset whose logdir has no plan.json yet is skipped with a note.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DATASETS=${DATASETS:-"fitzpatrick fairvision embed chexpert mimic"}
LOG_DIR=${LOG_DIR:-./logs}
DATA_DIR=${DATA_DIR:-./data}

failed=0
for dataset in $DATASETS; do
  logdir="$LOG_DIR/$dataset"
  if [ ! -f "$logdir/plan.json" ]; then
    echo "== $dataset: no campaign in $logdir (run scripts/train_all.sh first); skipped"
    continue
  fi
  echo "== $dataset: $logdir"
  data_flag=()
  if [ -d "$DATA_DIR/$dataset" ]; then
    data_flag=(--data_root="$DATA_DIR/$dataset")
  fi
  if ! "$PYTHON" mem_inf_stats.py --logdir="$logdir" --dataset="$dataset" "${data_flag[@]}" "$@"; then
    echo "   mem_inf_stats.py failed for $dataset" >&2
    failed=1
  fi
done
exit "$failed"
