"""The monitor's predictor, thresholds and rescue policy for the breaking sweep.

Predictor: ``format_overflow`` (a head's q·kᵀ product near, or projected to reach within
``overflow_horizon`` steps, the largest value of the number format it is computed in) and
``activation_overflow`` (the same test on the largest module output in that format). The other
detectors are not counted as predictions. Thresholds: the library's (``THRESHOLDS`` and the
per-format ``DTYPE_THRESHOLDS``), whose overflow numbers were chosen on the design seed.

Rescue policy (the ``monitor`` arm), from the first prediction:
- ``format_overflow`` → QK-clip at the format's limit ÷ 8 (in logits), re-applied on every
  observed step (the library's default rule for it);
- ``activation_overflow`` → roll back to the newest in-memory snapshot (every 8 healthy steps, 3
  kept) and halve the learning rate; at most 3 times.
"""

from __future__ import annotations

from attnkit.monitor import Chain, Policy, ReduceLR, Rollback, Snapshots, Thresholds
from attnkit.monitor.interventions import format_clip_rule

PREDICTORS = ("format_overflow", "activation_overflow")


def thresholds_for(cfg) -> Thresholds:
    return Thresholds()


def POLICY(cfg):
    """(policy, snapshots, thresholds) for the ``monitor`` arm."""
    rules = {"format_overflow": format_clip_rule(),
             "activation_overflow": lambda issue: Chain((Rollback(times=3), ReduceLR(0.5)))}
    return Policy(rules=rules), Snapshots(every=8, keep=3), thresholds_for(cfg)
