"""``analyze``: run a model on text through the seam and turn its attention into statistics and issues."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from attnkit.analyze.diagnose import ISSUE_KEYS, diagnose
from attnkit.analyze.mitigations import Mitigation, find_mitigations
from attnkit.common.findings import Finding
from attnkit.errors import UserError
from attnkit.seam import AttentionSession, NoAttentionError, StatsCollector, observe_forward

SCHEMA_VERSION = "1.1"  # 1.1: heads carry "stack" and "kind" beside "layer"


@dataclass
class Analysis:
    model: str
    dtype: torch.dtype
    tokens: int
    batch: int
    heads: list[dict]
    issues: list[Finding]
    mitigations: list[Mitigation]
    call_order: list[int]
    sample_rows: int | None = None
    token_text: list[str] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)  # attnkit.gate gates: mean gate / share below 0.1 per head

    @property
    def layers(self) -> list[int]:
        return sorted({h["layer"] for h in self.heads})

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "dtype": str(self.dtype).replace("torch.", ""),
            "tokens": self.tokens,
            "batch": self.batch,
            "sample_rows": self.sample_rows,
            "num_layers": len(self.layers),
            "layers": self.layers,
            "mitigations": [m.detail for m in self.mitigations],
            "heads": [_finite(h) for h in self.heads],
            "issues": [i.to_dict(ISSUE_KEYS) for i in self.issues],
            **({"gates": [_finite(g) for g in self.gates]} if self.gates else {}),  # only for a gated model
        }


def _finite(d: dict) -> dict:
    """JSON has no NaN or Infinity: those become null / strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and v != v:
            out[k] = None
        elif isinstance(v, float) and v in (float("inf"), float("-inf")):
            out[k] = "inf" if v > 0 else "-inf"
        else:
            out[k] = v
    return out


def analyze(
    model: nn.Module,
    inputs: dict,
    *,
    name: str = "model",
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
) -> Analysis:
    """Per-head statistics and diagnoses for one forward of ``model`` on ``inputs``.

    The model is left as it was found (training mode, attention implementation).
    """
    collector = StatsCollector()
    session = AttentionSession(taps=[collector], layers=layers, heads=heads, sample_rows=sample_rows, seed=seed)
    mask = inputs.get("attention_mask")
    if mask is not None:
        session.query_mask = mask.bool()
    from attnkit.gate.gating import GateStats, find_gates

    gate_stats = GateStats(model) if find_gates(model) else None
    if gate_stats is None:
        observe_forward(model, session, **inputs)
    else:
        with gate_stats:
            observe_forward(model, session, **inputs)
    if not collector.layers:
        if layers is not None:
            raise UserError(f"none of the selected layers {sorted(layers)} ran; the model has layers {sorted({site.layer for site in session.sites_seen})}")
        raise NoAttentionError(f"{type(model).__name__} ran no attention call attnkit could see")
    dtype = next(iter(collector.dtypes.values()))
    call_order = [site.layer for site in collector.call_order]
    config = getattr(model, "config", None)
    mitigations = find_mitigations(config) if config is not None else []
    head_stats = collector.heads()
    ids = inputs.get("input_ids")
    return Analysis(
        model=name,
        dtype=dtype,
        tokens=int(ids.shape[1]) if ids is not None else 0,
        batch=int(ids.shape[0]) if ids is not None else 0,
        heads=head_stats,
        issues=diagnose(head_stats, dtype, mitigations, call_order),
        mitigations=mitigations,
        call_order=call_order,
        sample_rows=sample_rows if collector.sampled else None,
        gates=gate_stats.heads() if gate_stats is not None else [],
    )
