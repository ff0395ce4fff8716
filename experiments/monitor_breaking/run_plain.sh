#!/bin/sh
# The plain (monitored, no policy) runs of the breaking sweep: seed 0 designs, seed 1 is held out.
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking}
python3 sweep.py --out "$OUT" --seeds 0,1 --lrs 0.05,0.1,0.2 --warmups 10 --jobs 3
python3 sweep.py --out "$OUT" --seeds 0,1 --lrs 0.2 --warmups 50 --jobs 3
