"""gate: gated attention added to a model, as modules hooked onto it (identity at initialisation,
saved adapter-style as their own safetensors + JSON beside the model)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnkit.common.lazy import lazy_exports

# name -> the module that defines it, imported on first use (see attnkit.common.lazy)
_EXPORTS = {
    "GATE_KINDS": "attnkit.gate.gating",
    "AttentionGate": "attnkit.gate.gating",
    "GateStats": "attnkit.gate.gating",
    "add_gates": "attnkit.gate.gating",
    "find_gates": "attnkit.gate.gating",
    "remove_gates": "attnkit.gate.gating",
    "GateTap": "attnkit.gate.gate_tap",
    "load_gated": "attnkit.gate.gated",
    "load_gates": "attnkit.gate.io",
    "save_gates": "attnkit.gate.io",
    "gate_layouts": "attnkit.gate.gating",
    "KIND_HELP": "attnkit.gate.kinds",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and the API reference read
    from attnkit.gate.gating import AttentionGate, GATE_KINDS, GateStats, add_gates, find_gates, gate_layouts, remove_gates
    from attnkit.gate.gate_tap import GateTap
    from attnkit.gate.gated import load_gated
    from attnkit.gate.io import load_gates, save_gates
    from attnkit.gate.kinds import KIND_HELP
