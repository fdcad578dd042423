# Worker logs shared by scripts/train_all.sh and scripts/slurm/train_array.sbatch (sourced).
#
# Logs are appended to, never overwritten: a re-run keeps the log that holds the last run's error.
# Each start is marked by a header line, and the byte offset where it began is remembered, so the
# error shown for a failed worker is from this start, not an older one.

# worker_log_start LOG: appends a header to LOG and prints the offset where this start's output begins.
worker_log_start() {
  local log=$1
  mkdir -p "$(dirname "$log")"
  local offset
  offset=$( { stat -c %s "$log" 2>/dev/null || stat -f %z "$log" 2>/dev/null || echo 0; } | head -n 1)
  echo "==== $(date '+%Y-%m-%d %H:%M:%S') worker started on $(hostname), pid $$" >>"$log"
  echo "$offset"
}

# worker_last_error LOG OFFSET: the last error line written to LOG since OFFSET (else its last line).
worker_last_error() {
  local log=$1 offset=$2 since line
  since=$(tail -c +"$((offset + 1))" "$log" 2>/dev/null)
  line=$(printf '%s\n' "$since" | grep -E '^(error: |[A-Za-z_.]*(Error|Exception)\b|Killed|Segmentation fault)' | tail -n 1)
  if [ -z "$line" ]; then
    line=$(printf '%s\n' "$since" | grep -v '^[[:space:]]*$' | tail -n 1)
  fi
  printf '%s\n' "${line:-(the log is empty)}"
}
