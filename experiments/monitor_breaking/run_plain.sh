#!/bin/sh
# The plain (monitored, no policy) runs of the breaking sweep; seed 0 designs, seed 1 is held out.
# Design seed 0: 2 architectures x 3 precisions x 3 temperatures x LR 0.05/0.1/0.2, warm-up 10.
# Held-out seed 1: fp16 on the same grid, bf16 at LR 0.2 (fp32 not run: no format line is reachable
# there, so the predictor cannot fire; no fp32 run of the design seed failed).
# Both seeds: fp16 at LR 0.4 (warm-up 10) and at LR 0.2 with warm-up 50 (the warm-up axis).
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking2}
python3 sweep.py --out "$OUT" --seeds 0 --precisions fp16 --lrs 0.05,0.1,0.2 --warmups 10 --jobs 3
python3 sweep.py --out "$OUT" --seeds 1 --precisions fp16 --lrs 0.05,0.1,0.2 --warmups 10 --jobs 3
python3 sweep.py --out "$OUT" --seeds 0,1 --precisions fp16 --lrs 0.4 --warmups 10 --jobs 3
python3 sweep.py --out "$OUT" --seeds 0,1 --precisions fp16 --lrs 0.2 --warmups 50 --jobs 3
python3 sweep.py --out "$OUT" --seeds 1 --precisions bf16 --lrs 0.2 --warmups 10 --jobs 3
python3 sweep.py --out "$OUT" --seeds 0 --precisions bf16,fp32 --lrs 0.05,0.1,0.2 --warmups 10 --jobs 3
