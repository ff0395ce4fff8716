#!/bin/sh
# The rescue arms of the breaking sweep after the predictor was tuned (policies.py, OBSERVE_FIRST):
# 1. design seed 0: the half-LR reference and two rescue policies on the runs that failed;
# 2. held-out seed 1 (HELDOUT=2: the second held-out seed): the half-LR reference and the chosen policy (DEFAULT_POLICY) on the runs that
#    failed, and on the healthy runs the predictor warned about (the cost of an acted-on false alarm).
# The monitor arms observe every step for the first 16, then 1 in 4. 2 processes, niced.
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking3}
GRID="--archs gpt2,llama --precisions fp16 --temperatures 0.25,1,4 --lrs 0.05,0.1,0.2,0.4 --warmups 10,50"
RUN="nice -n 5 python3 sweep.py --out $OUT --every 4 --observe-first 16 --jobs 2 $GRID --only-failed-from $OUT"
STAGE=${STAGE:-all}
if [ $STAGE = all ] || [ $STAGE = design ]; then
  $RUN --seeds 0 --arms half_lr,monitor_rollback_lr,monitor_clip_lr
fi
if [ $STAGE = all ] || [ $STAGE = design_clip ]; then
  # QK-clip alone for format_overflow (the library's rule), against clip_lr: only GPT-2 differs (Llama's
  # failures are activation_overflow, whose rule the two share)
  nice -n 5 python3 sweep.py --out $OUT --every 4 --observe-first 16 --jobs 2 --archs gpt2 --precisions fp16 \
      --temperatures 0.25,1,4 --lrs 0.05,0.1,0.2,0.4 --warmups 10,50 --only-failed-from $OUT --seeds 0 --arms monitor_clip
fi
if [ $STAGE = all ] || [ $STAGE = heldout ]; then
  POLICY=${POLICY:-clip_lr}  # chosen on the design seed: rescued as many as rollback_lr (6/7), 11 steps undone against 18
  $RUN --seeds ${HELDOUT:-1} --arms half_lr,monitor_$POLICY --only-warned
fi
if [ $STAGE = baselines ]; then
  # what users do instead, on the second held-out seed's failures at LR 0.2 and 0.4 (as the first round on seed 1)
  nice -n 5 python3 sweep.py --out $OUT --jobs 2 --seeds ${HELDOUT:-2} --archs gpt2,llama --precisions fp16 \
      --temperatures 0.25,1,4 --lrs 0.2,0.4 --warmups 10,50 --arms clip,spike_rollback,zloss,qknorm --only-failed-from $OUT
fi
if [ $STAGE = healthy ]; then
  # the chosen policy on every held-out healthy run (the warned ones are done): its cost where nothing failed
  for seed in 1 2; do
    nice -n 5 python3 sweep.py --out $OUT --every 4 --observe-first 16 --jobs 2 --seeds $seed --archs gpt2,llama \
        --precisions fp16 --temperatures 0.25,1,4 --lrs 0.05,0.1,0.2,0.4 --warmups 10,50 --arms monitor_clip_lr --skip-failed-from $OUT
  done
  nice -n 5 python3 sweep.py --out $OUT --every 4 --observe-first 16 --jobs 2 --seeds 1 --precisions bf16 --lrs 0.2 \
      --warmups 10 --arms monitor_clip_lr --skip-failed-from $OUT
fi
