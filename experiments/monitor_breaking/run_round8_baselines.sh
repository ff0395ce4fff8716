#!/bin/sh
# Eighth round (README "Eighth round"): what users do instead, on the same fresh seeds 13-16 (every run):
# gradient clipping, the attention-blind loss-spike rollback, z-loss, QK-norm from the start (Llama only).
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking5}
for part in "--lrs 0.05,0.1,0.2,0.4 --warmups 10" "--lrs 0.2 --warmups 50"; do
  RUN="nice -n 5 python3 sweep.py --out $OUT --jobs 2 --precisions fp16 --temperatures 0.25,1,4 $part --rule v2 --steps 200 --seeds 13,14,15,16"
  $RUN --archs gpt2,llama --arms clip,spike_rollback,zloss
  $RUN --archs llama --arms qknorm
done
