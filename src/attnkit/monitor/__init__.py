"""``attnkit monitor``: watch attention while a model trains, warn before it breaks, act on it.

    from attnkit.monitor import AttentionMonitor, Policy
    with AttentionMonitor(model, every=16, log_dir="runs/x", optimizer=opt, policy=Policy()) as monitor:
        for step, batch in enumerate(loader):
            ...
            monitor.on_step(step, loss=loss)

See ``monitor.py`` (observation and history), ``detectors.py`` (trends and thresholds),
``interventions.py`` (QK-clip, soft-cap, temperature, LR, dropout, grad clip, rollback; the policy),
``snapshots.py`` (the in-memory snapshots a rollback restores),
``nonfinite.py`` (NaN/Inf tracer), ``emit.py`` (JSONL, CSV, console, TensorBoard, W&B),
``integrations/`` (HF Trainer, Lightning), ``panel.py`` (the per-layer panel: max |logit| and entropy
per head, warning and intervention markers) and ``report.py`` (figures from the JSONL).
"""

from attnkit.monitor.detectors import DETECTORS, Thresholds
from attnkit.monitor.emit import EMITTERS, Emitter, StepRecord
from attnkit.monitor.interventions import (
    DEFAULT_RULES, INTERVENTIONS, ROLLBACK_RULES, AttentionDropout, Chain, GradClip, LRBackoff, LRToRate, Policy, QKClip,
    ReduceLR, Rollback, format_clip_rule, format_rollback_rule, qk_clip_layout, soft_cap, temperature, warmup_rate_rule,
)
from attnkit.common.findings import Finding as Issue  # the one finding type, by the name monitor users know
from attnkit.monitor.issues import Diagnosis
from attnkit.monitor.monitor import DEFAULT_EVERY, AttentionMonitor
from attnkit.monitor.nonfinite import TraceResult, trace_nonfinite
from attnkit.monitor.snapshots import Snapshot, Snapshots

__all__ = [
    "DEFAULT_EVERY", "DEFAULT_RULES", "DETECTORS", "EMITTERS", "INTERVENTIONS", "AttentionDropout", "AttentionMonitor",
    "Chain",
    "Diagnosis", "Emitter", "GradClip", "Issue", "LRBackoff", "LRToRate", "Policy", "QKClip", "ReduceLR", "ROLLBACK_RULES",
    "Rollback", "Snapshot", "Snapshots", "StepRecord",
    "Thresholds",
    "TraceResult", "format_clip_rule", "format_rollback_rule", "qk_clip_layout", "soft_cap", "temperature",
    "trace_nonfinite", "warmup_rate_rule",
]
