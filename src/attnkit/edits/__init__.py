"""Edits: changes that carry parameters, living beside the seam as modules hooked onto the model
(identity at initialisation, saved adapter-style as their own safetensors + JSON)."""

from attnkit.edits.gating import GATE_KINDS, AttentionGate, GateStats, add_gates, find_gates, remove_gates
from attnkit.edits.gate_tap import GateTap
from attnkit.edits.io import load_gates, save_gates
from attnkit.edits.layouts import GATE_LAYOUTS, gate_layouts

__all__ = ["GATE_KINDS", "GATE_LAYOUTS", "AttentionGate", "GateStats", "GateTap", "add_gates", "find_gates", "gate_layouts",
           "load_gates", "remove_gates", "save_gates"]
