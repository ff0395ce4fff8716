#!/bin/sh
# Eighth round (README "Eighth round"). STAGE=heldout: fresh seeds 13 to 16 — plain runs (every step observed),
# half-LR references for every failure, the library's own rules on every run (run_heldout.sh).
set -e
[ "$STAGE" = heldout ] || { echo "STAGE=heldout" >&2; exit 2; }
SEEDS="13 14 15 16" ARMS=monitor_library exec "$(dirname "$0")/run_heldout.sh"
