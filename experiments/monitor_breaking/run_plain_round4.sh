#!/bin/sh
# Fourth round: the plain fp16 runs for 200 steps (outcomes labelled over 200 steps, warnings scored on
# steps 0-149; see README "Fourth round"), every step observed. Seeds 0-4 are the design seeds (seen in
# earlier rounds); seeds 5 and 6 are held out: run once, scored once, after the policy is fixed.
# The same fp16 grid on every seed: GPT-2 and Llama x t 0.25, 1, 4 x LR 0.05, 0.1, 0.2, 0.4 (warm-up 10)
# and LR 0.2 (warm-up 50). 2 processes, 1 thread each, niced (the CPU is shared).
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking5}
SEEDS=${SEEDS:-0 1 2 3 4 5 6}
RUN="nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --precisions fp16 --steps 200"
for seed in $SEEDS; do
  $RUN --seeds $seed --lrs 0.05,0.1,0.2,0.4 --warmups 10
  $RUN --seeds $seed --lrs 0.2 --warmups 50
done
