#!/bin/sh
# Fourth round's arms (after run_plain_round4.sh; 200 steps; failures by rule v2 over the 200 steps):
#   STAGE=design_ref       half-LR references for every design failure (seeds 0-4)
#   STAGE=design_policies  the three rollback policies (policies.py) on the design failures with a finite
#                          half-LR reference (the only ones the plain rescue test scores)
#   STAGE=heldout          seeds 5 and 6: half-LR references and the chosen policy on every failure, then the
#                          chosen policy on every healthy run
#   STAGE=baselines        seeds 5 and 6: gradient clipping, loss-spike rollback, z-loss, QK-norm on every failure
#   STAGE=baseline_costs   the baselines on the held-out LR-0.05 runs that were healthy: their cost
# The monitor arms observe 1 step in 4, every step for the first 16 and one in NEAR while a figure is
# within the overflow floor of its format's limit. 2 processes, niced.
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking5}
NEAR=${NEAR:?set NEAR to policies.NEAR_LIMIT_EVERY}
POLICY=${POLICY:-rollback_lr_noclip}  # policies.DEFAULT_POLICY once chosen on the design seeds
GRID="--archs gpt2,llama --precisions fp16 --temperatures 0.25,1,4 --lrs 0.05,0.1,0.2,0.4 --warmups 10,50"
SCHEDULE="--every 4 --observe-first 16 --near-limit-every $NEAR"
RUN="nice -n 5 python3 sweep.py --out $OUT --jobs 2 $GRID --rule v2 --steps 200"
case $STAGE in
  design_ref) $RUN --seeds 0,1,2,3,4 --arms half_lr --only-failed-from $OUT ;;
  design_policies) $RUN $SCHEDULE --seeds 0,1,2,3,4 --only-failed-from $OUT --only-finite-ref \
      --arms monitor_rollback_lr_noclip,monitor_rollback_lr_keep,monitor_rollback_trend_lr_keep ;;
  heldout)
    $RUN $SCHEDULE --seeds 5,6 --arms half_lr,monitor_$POLICY --only-failed-from $OUT
    $RUN $SCHEDULE --seeds 5,6 --arms monitor_$POLICY --skip-failed-from $OUT ;;
  baselines) $RUN --seeds 5,6 --arms clip,spike_rollback,zloss,qknorm --only-failed-from $OUT ;;
  baseline_costs) nice -n 5 python3 sweep.py --out $OUT --jobs 2 --archs gpt2,llama --precisions fp16 \
      --temperatures 0.25,1,4 --lrs 0.05 --warmups 10 --seeds 5,6 --arms clip,spike_rollback,zloss,qknorm \
      --skip-failed-from $OUT --rule v2 --steps 200 ;;
  *) echo "STAGE must be design_ref, design_policies, heldout, baselines or baseline_costs" >&2; exit 2 ;;
esac
