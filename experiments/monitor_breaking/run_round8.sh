#!/bin/sh
# Eighth round (README "Eighth round"). STAGE=heldout: fresh seeds 13 to 16 — plain runs (every step observed),
# half-LR references for every failure, the library's own rules
# on every run. 200 steps, failures by rule v2. 2 processes, niced.
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking5}
MON="--every 4 --observe-first 16 --near-limit-every 2"
if [ "$STAGE" = heldout ]; then
  for seed in 13 14 15 16; do
    nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --precisions fp16 --steps 200 --seeds $seed --lrs 0.05,0.1,0.2,0.4 --warmups 10
    nice -n 5 python3 sweep.py --out $OUT --every 1 --jobs 2 --precisions fp16 --steps 200 --seeds $seed --lrs 0.2 --warmups 50
  done
  for part in "--lrs 0.05,0.1,0.2,0.4 --warmups 10" "--lrs 0.2 --warmups 50"; do
    RUN="nice -n 5 python3 sweep.py --out $OUT --jobs 2 --archs gpt2,llama --precisions fp16 --temperatures 0.25,1,4 $part --rule v2 --steps 200 --seeds 13,14,15,16"
    $RUN --arms half_lr --only-failed-from $OUT
    $RUN $MON --arms monitor_library
  done
else
  echo "STAGE=heldout" >&2; exit 2
fi
