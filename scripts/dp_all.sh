#!/usr/bin/env bash
# DP-SGD across privacy budgets on one dataset: a shadow-model campaign at each epsilon, then the
# audit of each campaign and a comparison of them all (eSF per epsilon with the AUC bound each
# guarantee implies, utility and per-subgroup utility against epsilon, empirical epsilon lower
# bounds beside the theoretical ones).
#
#   bash scripts/dp_all.sh
#   DATASET=chexpert DP_UNIT=patient EPSILONS="1 8 inf" DATA_DIR=/data LOG_DIR=/shared/logs bash scripts/dp_all.sh
#   bash scripts/dp_all.sh --epochs=30 --clip_norm=0.5   # extra flags go to every worker
#
# Like scripts/train_all.sh (which it runs once per epsilon, so workers, GPUs and the shared work
# queue behave the same), run the same line on every machine that sees LOG_DIR.
#
# Settings (environment variables):
#   DATASET     the dataset (fitzpatrick); $DATA_DIR/$DATASET is its --data_root
#   EPSILONS    target epsilons ("1 8 100 inf"; inf = ordinary training, the reference)
#   DP_UNIT     record or patient (record); patient-level DP is what a patient-level audit is
#               compared with
#   DELTA       --delta (0 = 1/number of training units)
#   DATA_DIR    ./data;  LOG_DIR ./logs (campaign at epsilon E: $LOG_DIR/dp_epsE/$DATASET)
#   FIG_DIR     ./figs (comparison: $FIG_DIR/${DATASET}_dp/budgets.html, each epsilon's own report in
#               $FIG_DIR/${DATASET}_dp/dp_epsE_$DATASET/report.html; a single epsilon: ${DATASET}_epsE)
#   AUDIT_ARGS  extra flags for mem_inf_stats.py (e.g. "--eval_size=4")
#   N_RUNS, WORKERS_PER_GPU, GPUS, PYTHON   as in scripts/train_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DATASET=${DATASET:-fitzpatrick}
EPSILONS=${EPSILONS:-"1 8 100 inf"}
DP_UNIT=${DP_UNIT:-record}
DELTA=${DELTA:-0}
DATA_DIR=${DATA_DIR:-./data}
LOG_DIR=${LOG_DIR:-./logs}
FIG_DIR=${FIG_DIR:-./figs}
AUDIT_ARGS=${AUDIT_ARGS:-}
read -r -a AUDIT_FLAGS <<< "$AUDIT_ARGS"
export PYTHON DATA_DIR

failed=0
logdirs=()
for eps in $EPSILONS; do
  echo "==== $DATASET at epsilon=$eps ($DP_UNIT-level)"
  if ! DATASETS="$DATASET" LOG_DIR="$LOG_DIR/dp_eps$eps" bash scripts/train_all.sh \
      --epsilon="$eps" --delta="$DELTA" --dp_unit="$DP_UNIT" "$@"; then
    echo "   training at epsilon=$eps failed; see $LOG_DIR/dp_eps$eps/$DATASET/worker_logs/" >&2
    failed=1
    continue
  fi
  logdirs+=("$LOG_DIR/dp_eps$eps/$DATASET")
done

if [ "${#logdirs[@]}" -gt 1 ]; then
  # One call audits every campaign (into $FIG_DIR/${DATASET}_dp/<dp_epsE_dataset>/) and compares them.
  joined=$(IFS=,; echo "${logdirs[*]}")
  echo "==== audits and comparison across epsilons -> $FIG_DIR/${DATASET}_dp"
  if ! "$PYTHON" mem_inf_stats.py --logdir="$joined" --dataset="$DATASET" --out_dir="$FIG_DIR/${DATASET}_dp" "${AUDIT_FLAGS[@]}"; then
    echo "   mem_inf_stats.py failed for $joined" >&2
    failed=1
  fi
elif [ "${#logdirs[@]}" -eq 1 ]; then
  logdir=${logdirs[0]}
  eps=${logdir#"$LOG_DIR/dp_eps"}
  eps=${eps%%/*}
  echo "==== audit of $logdir"
  if ! "$PYTHON" mem_inf_stats.py --logdir="$logdir" --dataset="$DATASET" --out_dir="$FIG_DIR/${DATASET}_eps$eps" "${AUDIT_FLAGS[@]}"; then
    echo "   mem_inf_stats.py failed for $logdir" >&2
    failed=1
  fi
fi
exit "$failed"
