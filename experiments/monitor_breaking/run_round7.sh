#!/bin/sh
# Seventh round (README "Seventh round"). STAGE=heldout: fresh seeds 11 and 12 — plain runs (every step observed),
# half-LR references for every failure, the library's own rules (with warmup_headroom) and the sixth round's rule
# without it on every run (run_heldout.sh).
set -e
[ "$STAGE" = heldout ] || { echo "STAGE=heldout" >&2; exit 2; }
SEEDS="11 12" ARMS=monitor_library,monitor_rollback_trend_lr_quarter exec "$(dirname "$0")/run_heldout.sh"
