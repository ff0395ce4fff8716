#!/bin/sh
# A held-out stage of the breaking sweep: on fresh SEEDS (space-separated), the plain runs of the 30-run fp16 grid
# a seed (200 steps, every step observed), half-LR references for every failure, and the monitor arms ARMS
# (comma-separated) on every run; failures by rule v2. 2 processes, niced. Called by run_round6.sh, run_round7.sh
# and run_round8.sh with their seeds and arms:
#     SEEDS="13 14" ARMS=monitor_library experiments/monitor_breaking/run_heldout.sh
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking5}
MON="--every 4 --observe-first 16 --near-limit-every 2"
: "${SEEDS:?SEEDS=\"11 12\" (space-separated)}" "${ARMS:?ARMS=monitor_library,... (comma-separated)}"
for seed in $SEEDS; do
  nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --precisions fp16 --steps 200 --seeds $seed --lrs 0.05,0.1,0.2,0.4 --warmups 10
  nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --precisions fp16 --steps 200 --seeds $seed --lrs 0.2 --warmups 50
done
LIST=$(echo $SEEDS | tr ' ' ,)
for part in "--lrs 0.05,0.1,0.2,0.4 --warmups 10" "--lrs 0.2 --warmups 50"; do
  RUN="nice -n 5 python3 sweep.py --out $OUT --jobs 2 --archs gpt2,llama --precisions fp16 --temperatures 0.25,1,4 $part --rule v2 --steps 200 --seeds $LIST"
  $RUN --arms half_lr --only-failed-from $OUT
  $RUN $MON --arms $ARMS
done
