#!/bin/sh
# Fifth round (README "Fifth round"): fresh seeds 7 and 8, plain runs (every step observed), half-LR
# references for every failure, the library's rule (rollback_trend_lr_keep) and rollback_trend_lr_age on
# every run. 200 steps, failures by rule v2. 2 processes, niced.
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking5}
GRID="--archs gpt2,llama --precisions fp16 --temperatures 0.25,1,4 --lrs 0.05,0.1,0.2,0.4 --warmups 10,50"
for seed in 7 8; do
  nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --precisions fp16 --steps 200 --seeds $seed --lrs 0.05,0.1,0.2,0.4 --warmups 10
  nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --precisions fp16 --steps 200 --seeds $seed --lrs 0.2 --warmups 50
done
RUN="nice -n 5 python3 sweep.py --out $OUT --jobs 2 $GRID --rule v2 --steps 200 --seeds 7,8"
$RUN --arms half_lr --only-failed-from $OUT
$RUN --every 4 --observe-first 16 --near-limit-every 2 --arms monitor_rollback_trend_lr_keep,monitor_rollback_trend_lr_age
