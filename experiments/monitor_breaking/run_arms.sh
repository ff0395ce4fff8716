#!/bin/sh
# The arms of the breaking sweep on the held-out seed, in order of need: the half-LR reference and the
# monitor's policy on the runs that failed (the monitor also on the healthy runs it warned about:
# the cost of an acted-on false alarm), then the baselines on the runs that failed at LR 0.2 and 0.4.
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking2}
GRID="--seeds 1 --archs gpt2,llama --precisions fp16,bf16 --temperatures 0.25,1,4 --lrs 0.05,0.1,0.2,0.4 --warmups 10,50"
python3 sweep.py --out "$OUT" $GRID --arms monitor,half_lr --only-failed-from "$OUT" --jobs 3
python3 sweep.py --out "$OUT" $GRID --arms monitor --only-failed-from "$OUT" --only-warned --jobs 3
# the baselines on the failed runs at LR 0.2 and 0.4 only (the CPU budget)
python3 sweep.py --out "$OUT" --seeds 1 --archs gpt2,llama --precisions fp16,bf16 --temperatures 0.25,1,4 --lrs 0.2,0.4 \
    --warmups 10,50 --arms clip,spike_rollback,zloss,qknorm --only-failed-from "$OUT" --jobs 3
# the baselines' cost on healthy runs: the held-out fp16 runs at LR 0.05 (all six stayed healthy)
python3 sweep.py --out "$OUT" --seeds 1 --archs gpt2,llama --precisions fp16 --temperatures 0.25,1,4 --lrs 0.05 \
    --warmups 10 --arms clip,spike_rollback,zloss,qknorm --jobs 3
