#!/bin/sh
# Sixth round (README "Sixth round"). STAGE=design: the two candidate cuts on the design seeds 0-8 (every failure
# with a finite half-LR reference, every healthy run). STAGE=heldout: fresh seeds 9 and 10 — plain runs (every step
# observed), half-LR references for every failure, the library's own rule and the halving rule on every run.
# 200 steps, failures by rule v2. 2 processes, niced.
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking5}
MON="--every 4 --observe-first 16 --near-limit-every 2"
if [ "$STAGE" = design ]; then
  ARMS=monitor_rollback_trend_lr_quarter,monitor_rollback_trend_lr_eighth
  for part in "--lrs 0.05,0.1,0.2,0.4 --warmups 10" "--lrs 0.2 --warmups 50"; do
    RUN="nice -n 5 python3 sweep.py --out $OUT --jobs 2 --archs gpt2,llama --precisions fp16 --temperatures 0.25,1,4 $part --rule v2 --steps 200 --seeds 0,1,2,3,4,5,6,7,8"
    $RUN $MON --arms $ARMS --only-failed-from $OUT --only-finite-ref
    $RUN $MON --arms $ARMS --skip-failed-from $OUT
  done
elif [ "$STAGE" = heldout ]; then
  SEEDS="9 10" ARMS=monitor_library,monitor_rollback_trend_lr_keep exec ./run_heldout.sh
else
  echo "STAGE=design or STAGE=heldout" >&2; exit 2
fi
