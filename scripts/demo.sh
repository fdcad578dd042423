#!/usr/bin/env bash
# The whole audit end to end on a built-in synthetic chest X-ray dataset, on CPU, in a few minutes:
#   1. write a small dataset in the CheXpert layout with a few planted vulnerable patients
#      (their images are mislabelled, so a model can only fit them by memorising them),
#   2. train 32 small shadow models, each on a random half of the patients (chexpert.py),
#   3. attack them and report record / patient / subgroup risk (mem_inf_stats.py),
#   4. show where the planted patients rank: they should be at the top.
# Usage: bash scripts/demo.sh [output folder, default ./demo_out]   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-./demo_out}"
python="${PYTHON:-python}"
export MEDLEAK_CACHE_DIR="$out/cache"
start=$SECONDS

echo "== 1/4 synthetic CheXpert-layout dataset -> $out/data"
"$python" -m medleak.data_utils.synthetic --out_dir="$out/data" --n_patients=240 --img_size=32

echo "== 2/4 training 32 shadow models (wrn_10_1, 16x16, CPU) -> $out/logs"
# No augmentation, no weight decay and enough epochs that the models memorise what they cannot learn (the planted
# patients' wrong labels), as large models do on real data: wrn_10_1 reaches ~zero training loss on mislabelled
# images in 60 epochs (small_cnn never does; bench/memorisation.py), in the time small_cnn takes for 80.
"$python" chexpert.py --data_root="$out/data" --logdir="$out/logs" \
  --n_runs=32 --model=wrn_10_1 --img_size=16,16 --epochs=60 --batch_size=64 --grad_accum=1 \
  --learning_rate=0.05 --weight_decay=0 --warmup=0.02 --ema_decay=0 --augment=none --eval_views=1

echo "== 3/4 attacks and report -> $out/figs"
# 32 runs: 8 of them are attacked as held-out targets (the default, a quarter of the runs); 16 runs
# would audit too, but a patient's exact p-value then resolves only the strongest leaks.
"$python" mem_inf_stats.py --logdir="$out/logs" --dataset=chexpert --data_root="$out/data" \
  --out_dir="$out/figs"

echo "== 4/4 planted vulnerable patients"
"$python" - "$out" <<'PY'
import sys
from medleak.data_utils.synthetic import planted_ranks
out = sys.argv[1]
import pandas as pd
from medleak.io_utils import read_json
ranks, n = planted_ranks(f"{out}/data", f"{out}/figs/patient_risk.csv")
print(f"planted patients rank {ranks} of {n} patients by patient-level attack AUC (top decile: 1-{max(1, n // 10)})")
planted = read_json(f"{out}/data/planted_patients.json")["patient_ids"]
risk = pd.read_csv(f"{out}/figs/patient_risk.csv", dtype={"patient_id": str}).set_index("patient_id")
flagged = [p for p in planted if p in risk.index and risk.loc[p, "at_risk"] == 1]
print(f"planted patients at risk (FDR-controlled): {len(flagged)} of {len([p for p in planted if p in risk.index])}")
print("verdict:", read_json(f"{out}/figs/attack_summary.json")["verdict"])
PY
echo
echo "Done in $((SECONDS - start)) s. Report: $out/figs/report.html"
