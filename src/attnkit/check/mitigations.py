"""Mitigations the config already has, shared with ``analyze`` (``attnkit.analyze.mitigations``),
and what each does to the check's numbers."""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.analyze.mitigations import Mitigation, find_mitigations
from attnkit.check.shape import AttentionShape

# What each mitigation changes in the estimate; the rest are named but change no number.
EFFECTS = {
    "logit_softcapping": "logits mapped to cap*tanh(L/cap): the largest logit never passes the cap (q.k before it can still overflow fp16)",
    "qk_norm": "||q|| = ||k|| = sqrt(d)*g: |logit| <= scale*d*g^2 whatever the weights do (weight growth moves only the gains g)",
    "upcast_attention": "QK^T and softmax in fp32: fp16/bf16 overflow and rounding of the logits do not apply",
    "layer_scaled_attention": "logits scaled by 1/(layer+1): layer 0 is the largest and is what the check estimates",
}


@dataclass(frozen=True)
class CheckMitigation:
    name: str
    detail: str
    effect: str | None  # None: named, but not part of the estimate

    def to_dict(self) -> dict:
        return {"name": self.name, "detail": self.detail, "effect": self.effect}


def config_mitigations(config) -> list[CheckMitigation]:
    found: list[Mitigation] = find_mitigations(config)
    return [CheckMitigation(m.name, m.detail, EFFECTS.get(m.name)) for m in found]


def upcasts(mitigations: list[CheckMitigation]) -> bool:
    return any(m.name == "upcast_attention" for m in mitigations)


def describe_bounds(shape: AttentionShape) -> list[str]:
    """One line per bound the estimate applied, with its number."""
    lines = []
    if shape.softcap:
        lines.append(f"soft-capping at {shape.softcap:g}: logits stay below {shape.softcap:g}")
    if shape.qk_norm:
        lines.append(f"QK-norm: |logit| <= scale*d*g^2 = {shape.scale * shape.head_dim:.3g}*g^2 (g = 1 at init)")
    return lines
