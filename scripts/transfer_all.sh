#!/usr/bin/env bash
# The DP_CXR / privacydomain experiment: pretrain on dataset A, DP fine-tune on B at several ε
# (record- and patient-level), evaluate every fine-tuned model on A, B and C, audit the fine-tuned
# campaigns, and write one comparison (utility in and out of domain, fairness gaps, attack risk
# per ε) as CSV, figures and an HTML page (docs/TRANSFER.md).
#
#   bash scripts/transfer_all.sh
#   A=mimic B=chexpert C=chestxray14 DATA_DIR=/data EPSILONS="1 8 inf" bash scripts/transfer_all.sh --epochs=20
#   # tiny, on CPU (e.g. on tests/layouts.py generated layouts):
#   N_RUNS=8 EPSILONS="8 inf" BOOTSTRAP=50 bash scripts/transfer_all.sh --model=small_cnn --img_size=16,16 \
#       --epochs=1 --batch_size=4 --eval_views=2
#
# Settings (environment variables):
#   A, B, C        pretraining, fine-tuning and third dataset (chexpert, mimic, chestxray14)
#   ROOT_A/B/C     their --data_root ($DATA_DIR/<name>); DATA_DIR ./data
#   EPSILONS       fine-tuning ε ("1 8 inf"); DP_UNITS "record patient"
#   FINETUNE       all or head (all);  N_RUNS shadow models per fine-tuning campaign (16; the audit needs 8+)
#   FT_ARGS        extra flags for the fine-tuning campaigns only (e.g. "--optimizer=nadam --learning_rate=2e-4
#                  --weight_decay=0 --clip_norm=1.5 --pos_weight=auto", DP_CXR's recipe)
#   BOOTSTRAP      evaluate.py's --bootstrap (1000);  AUDIT_ARGS extra flags for mem_inf_stats.py
#   LOG_DIR ./logs/transfer;  FIG_DIR ./figs/transfer;  CACHE_DIR (image cache);  PYTHON python
# Extra command-line flags go to every training command (pretraining and fine-tuning).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
A=${A:-chexpert}; B=${B:-mimic}; C=${C:-chestxray14}
DATA_DIR=${DATA_DIR:-./data}
ROOT_A=${ROOT_A:-$DATA_DIR/$A}; ROOT_B=${ROOT_B:-$DATA_DIR/$B}; ROOT_C=${ROOT_C:-$DATA_DIR/$C}
EPSILONS=${EPSILONS:-"1 8 inf"}
DP_UNITS=${DP_UNITS:-"record patient"}
FINETUNE=${FINETUNE:-all}
N_RUNS=${N_RUNS:-16}
BOOTSTRAP=${BOOTSTRAP:-1000}
LOG_DIR=${LOG_DIR:-./logs/transfer}
FIG_DIR=${FIG_DIR:-./figs/transfer}
read -r -a FT_FLAGS <<< "${FT_ARGS:-}"
read -r -a AUDIT_FLAGS <<< "${AUDIT_ARGS:-}"
CACHE_FLAGS=()
[ -n "${CACHE_DIR:-}" ] && CACHE_FLAGS=(--cache_dir="$CACHE_DIR")

echo "==== pretraining on $A ($ROOT_A) -> $LOG_DIR/pretrain_$A"
"$PYTHON" "$A.py" --data_root="$ROOT_A" --logdir="$LOG_DIR/pretrain_$A" --eval_only "${CACHE_FLAGS[@]}" "$@" || exit 1
PRETRAINED="$LOG_DIR/pretrain_$A/eval_only/model"

failed=0
mkdir -p "$LOG_DIR/evaluations"
for unit in $DP_UNITS; do
  for eps in $EPSILONS; do
    name="${unit}_eps$eps"
    logdir="$LOG_DIR/finetune_${B}_$name"
    echo "==== fine-tuning on $B at epsilon=$eps ($unit-level) -> $logdir"
    if ! "$PYTHON" "$B.py" --data_root="$ROOT_B" --logdir="$logdir" --init_from="$PRETRAINED" --finetune="$FINETUNE" \
        --epsilon="$eps" --dp_unit="$unit" --n_runs="$N_RUNS" --save_weights \
        --external_test="$A:$ROOT_A,$C:$ROOT_C" "${CACHE_FLAGS[@]}" "$@" "${FT_FLAGS[@]}"; then
      echo "   fine-tuning $name failed" >&2; failed=1; continue
    fi
    for target in "$A:$ROOT_A" "$B:$ROOT_B" "$C:$ROOT_C"; do
      dataset=${target%%:*}; root=${target#*:}
      "$PYTHON" evaluate.py --model_dir="$logdir/runs/run_0000/model" --dataset="$dataset" --data_root="$root" \
          --bootstrap="$BOOTSTRAP" --output="$LOG_DIR/evaluations/${name}_$dataset" "${CACHE_FLAGS[@]}" \
          || { echo "   evaluate.py $name on $dataset failed" >&2; failed=1; }
    done
    "$PYTHON" mem_inf_stats.py --logdir="$logdir" --dataset="$B" --out_dir="$FIG_DIR/audits/$name" "${AUDIT_FLAGS[@]}" \
        || { echo "   audit of $name failed" >&2; failed=1; }
  done
done

echo "==== comparison -> $FIG_DIR/transfer.html"
"$PYTHON" -m medleak.evaluation.transfer_report --eval_dir="$LOG_DIR/evaluations" --audit_dir="$FIG_DIR/audits" \
    --out_dir="$FIG_DIR" --in_domain="$B" || failed=1
exit $failed
