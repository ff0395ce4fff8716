#!/bin/sh
# After the sixth round (README "Sixth round: what an earlier warning could buy"): on every failure with a finite
# half-LR reference whose first warning came at step 50 or later (seeds 0-10), the plain run with its rate cut to a
# quarter from step 25 / step 50 (no monitor): the best a warning at that step acted on by the library's cut could give;
# ARMS=cut0.5_at25,cut0.5_at50: the same with the rate halved.
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking5}
for part in "--lrs 0.05,0.1,0.2,0.4 --warmups 10" "--lrs 0.2 --warmups 50"; do
  nice -n 5 python3 sweep.py --out $OUT --jobs 2 --archs gpt2,llama --precisions fp16 --temperatures 0.25,1,4 $part \
    --rule v2 --steps 200 --seeds 0,1,2,3,4,5,6,7,8,9,10 --arms ${ARMS:-cut0.25_at25,cut0.25_at50} \
    --only-failed-from $OUT --only-finite-ref --only-warned-after 50
done
