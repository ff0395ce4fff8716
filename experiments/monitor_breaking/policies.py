"""The monitor's thresholds and rescue policy for the breaking sweep."""

from __future__ import annotations

from attnkit.monitor import Chain, LRBackoff, Policy, QKClip, Rollback, Snapshots, Thresholds


def thresholds_for(cfg) -> Thresholds:
    return Thresholds()


def POLICY(cfg):
    """(policy, snapshots, thresholds) for the ``monitor`` arm."""
    rules = {t: (lambda i: Chain((Rollback(i.started, times=3), QKClip(), LRBackoff())))
             for t in ("softmax_saturation",)}
    return Policy(rules=rules), Snapshots(24, 4), thresholds_for(cfg)
