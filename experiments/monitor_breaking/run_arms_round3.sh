#!/bin/sh
# Third round's arms (after run_plain_round3.sh; failures by the second rule, sweep.label_v2):
#   STAGE=design_ref       half-LR references for every design failure (seeds 0-2)
#   STAGE=design_policies  clip_lr and the two new variants (policies.py) on the design failures with a
#                          finite half-LR reference (the only ones the plain rescue test can score)
#   STAGE=heldout_ref      seeds 3 and 4: the half-LR references alone (they do not depend on the policy)
#   STAGE=heldout          seeds 3 and 4: half-LR references and the chosen policy on every failure,
#                          then the chosen policy on every healthy run
#   STAGE=baselines        seeds 3 and 4: gradient clipping, loss-spike rollback, z-loss, QK-norm on every failure
#   STAGE=baseline_costs   the baselines on the held-out LR-0.05 runs (healthy): their cost
# The monitor arms observe 1 step in 4, every step for the first 16 and one in NEAR while a figure is
# within the overflow floor of its format's limit (policies.NEAR_LIMIT_EVERY). 2 processes, niced.
set -e
cd "$(dirname "$0")"
export PYTHONPATH="$(cd ../.. && pwd)/src:." HF_HUB_OFFLINE=1
OUT=${OUT:-../../runs/breaking4}
NEAR=${NEAR:?set NEAR to policies.NEAR_LIMIT_EVERY}
POLICY=${POLICY:-rollback_lr_noclip}  # chosen on the design seeds (policies.DEFAULT_POLICY)
GRID="--archs gpt2,llama --precisions fp16 --temperatures 0.25,1,4 --lrs 0.05,0.1,0.2,0.4 --warmups 10,50"
SCHEDULE="--every 4 --observe-first 16 --near-limit-every $NEAR"
RUN="nice -n 5 python3 sweep.py --out $OUT --jobs 2 $GRID --rule v2"
case $STAGE in
  design_ref) $RUN --seeds 0,1,2 --arms half_lr --only-failed-from $OUT ;;
  design_policies) $RUN $SCHEDULE --seeds 0,1,2 --only-failed-from $OUT --only-finite-ref \
      --arms monitor_clip_lr,monitor_clip_lr_release,monitor_rollback_lr_noclip ;;
  heldout_ref) $RUN --seeds 3,4 --arms half_lr --only-failed-from $OUT ;;
  heldout)
    $RUN $SCHEDULE --seeds 3,4 --arms half_lr,monitor_$POLICY --only-failed-from $OUT
    $RUN $SCHEDULE --seeds 3,4 --arms monitor_$POLICY --skip-failed-from $OUT ;;
  baselines) $RUN --seeds 3,4 --arms clip,spike_rollback,zloss,qknorm --only-failed-from $OUT ;;
  baseline_costs) nice -n 5 python3 sweep.py --out $OUT --jobs 2 --archs gpt2,llama --precisions fp16 \
      --temperatures 0.25,1,4 --lrs 0.05 --warmups 10 --seeds 3 --arms clip,spike_rollback,zloss,qknorm \
      --skip-failed-from $OUT --rule v2 ;;
  *) echo "STAGE must be design_ref, design_policies, heldout_ref, heldout, baselines or baseline_costs" >&2; exit 2 ;;
esac
