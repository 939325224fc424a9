#!/usr/bin/env bash
# Is a run reproducible, and what does train.deterministic cost? The fast recipe shortened to 2 epochs, seed 0,
# default and with --set train.deterministic=true, interleaved (default, det, det, default); prints each run's
# wall time and its test accuracy, val accuracy, test loss and val NLL (identical lines: the same bits).
#   bash bench/determinism.sh            (about 4 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
for run in default-1 deterministic-1 deterministic-2 default-2; do
  extra=()
  [[ $run == deterministic-* ]] && extra=(--set train.deterministic=true)
  start=$(date +%s.%N)
  .venv/bin/modelworks train classification --recipe fashion-mnist --set train.epochs=2 "${extra[@]}" \
    --name "determinism-$run-$(date +%H%M%S)" > "$out/$run.log" 2>&1
  end=$(date +%s.%N)
  printf '%-16s %6.1f s  ' "$run" "$(echo "$end - $start" | bc)"
  grep -E "test/acc1 |val/acc1 |test/loss |val/nll " "$out/$run.log" | tr -s ' ' | tr '\n' ' '
  echo
done
