"""The monitor's predictor, thresholds and rescue policy for the breaking sweep.

Predictor: ``format_overflow`` (a head's q·kᵀ product near, or projected to reach within
``overflow_horizon`` steps, the largest value of the number format it is computed in). Chosen on the
design seed; the other detectors are not counted as predictions.
Rescue policy: on that warning, QK-clip at the format's limit ÷ 8 (the library's ``DEFAULT_RULES``
for it), re-applied on every observed step.
"""

from __future__ import annotations

from attnkit.monitor import Policy, Thresholds
from attnkit.monitor.interventions import format_clip_rule

PREDICTORS = ("format_overflow",)


def thresholds_for(cfg) -> Thresholds:
    return Thresholds()


def POLICY(cfg):
    """(policy, snapshots, thresholds) for the ``monitor`` arm."""
    return Policy(rules={"format_overflow": format_clip_rule()}), None, thresholds_for(cfg)
