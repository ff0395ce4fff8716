#!/bin/sh
# The plain runs again, observed on EVERY step (--every 1), so the replay can judge any observation
# schedule (every step early, 1 in 4 later, ...) offline: analyze.py --observe thins the recording.
# Design seed 0 and held-out seed 1: the fp16 grid of run_plain.sh (LR 0.05/0.1/0.2 with warm-up 10,
# LR 0.4 with warm-up 10, LR 0.2 with warm-up 50); held-out seed 1 also bf16 at LR 0.2; a second
# held-out seed 2 on the same fp16 grid. 2 processes, 1 thread each, niced (the CPU is shared).
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking3}
RUN="nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --precisions fp16"
for seed in 0 1 2; do
  $RUN --seeds $seed --lrs 0.05,0.1,0.2,0.4 --warmups 10
  $RUN --seeds $seed --lrs 0.2 --warmups 50
  if [ $seed = 1 ]; then
    nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --seeds 1 --precisions bf16 --lrs 0.2 --warmups 10
  fi
done
