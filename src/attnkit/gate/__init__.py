"""gate: gated attention added to a model, as modules hooked onto it (identity at initialisation,
saved adapter-style as their own safetensors + JSON beside the model)."""

from attnkit.gate.gating import GATE_KINDS, AttentionGate, GateStats, add_gates, find_gates, remove_gates
from attnkit.gate.gate_tap import GateTap
from attnkit.gate.gated import load_gated
from attnkit.gate.io import load_gates, save_gates
from attnkit.seam.layouts import output_layouts as gate_layouts  # the modules a gate goes on

__all__ = ["GATE_KINDS", "AttentionGate", "GateStats", "GateTap", "add_gates", "find_gates", "gate_layouts",
           "load_gated", "load_gates", "remove_gates", "save_gates"]
