#!/bin/sh
# Third round: the plain fp16 runs observed on every step, now recording which updates the GradScaler
# skipped (the second failure rule, sweep.label_v2). Seeds 0, 1, 2 are the design seeds of this round
# (their outcomes were seen in the second round); seeds 3 and 4 are held out: run once, scored once,
# with the thresholds and the policy fixed on seeds 0-2 beforehand. The same fp16 grid on every seed:
# GPT-2 and Llama x t 0.25, 1, 4 x LR 0.05, 0.1, 0.2, 0.4 (warm-up 10) and LR 0.2 (warm-up 50).
# 2 processes, 1 thread each, niced (the CPU is shared).
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking4}
SEEDS=${SEEDS:-0 1 2 3 4}
RUN="nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --precisions fp16"
for seed in $SEEDS; do
  $RUN --seeds $seed --lrs 0.05,0.1,0.2,0.4 --warmups 10
  $RUN --seeds $seed --lrs 0.2 --warmups 50
done
