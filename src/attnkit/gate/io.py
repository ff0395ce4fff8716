"""Gates saved adapter-style: ``gates.safetensors`` (the gate parameters alone) + ``gate_config.json``,
attnkit's one parameter-store format (``attnkit.common.param_store``).

    save_gates(model, "out/")        # writes out/gates.safetensors and out/gate_config.json
    load_gates(model, "out/")        # adds the same gates to a model of the same architecture

Nothing is pickled: tensors through safetensors, the rest JSON. A missing, truncated or corrupted
file, a config that does not describe the model, or a tensor of the wrong shape is a ``UserError``
with one sentence naming the file (the CLI prints it as one line and exits 2).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from attnkit.common.param_store import ParamStore
from attnkit.gate.gating import GATE_KINDS, add_gates, find_gates, gate_state_dict, remove_gates
from attnkit.errors import UserError

STORE = ParamStore("gates.safetensors", "gate_config.json", "attnkit-gates/1", "attnkit gates", "attnkit gate config")
WEIGHTS, CONFIG, FORMAT = STORE.weights, STORE.header, STORE.format


def gate_config(model: nn.Module) -> dict:
    gates = find_gates(model)
    if not gates:
        raise UserError("the model has no attnkit gates to save")
    kinds = {g.kind for g in gates}
    return {"format": FORMAT, "kind": gates[0].kind if len(kinds) == 1 else sorted(kinds),
            "init_bias": gates[0].init_bias, "layers": [g.layer for g in gates],
            "num_heads": [g.num_heads for g in gates], "head_dim": [g.head_dim for g in gates],
            "hidden": [g.hidden for g in gates], "model_class": type(model).__name__}


def save_gates(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's gates to ``directory`` (created); each file whole or not at all."""
    return STORE.save(directory, gate_state_dict(model), gate_config(model))


def read_gate_config(directory: str | os.PathLike) -> dict:
    config = STORE.read_header(directory)
    path = Path(directory) / CONFIG
    kind = config.get("kind")
    if kind not in GATE_KINDS:
        raise UserError(f"{path} names gate kind {kind!r}; known: {', '.join(GATE_KINDS)}")
    layers = config.get("layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise UserError(f"{path} has no list of gated layers ('layers'); it is truncated or corrupted")
    return config


def read_gate_weights(directory: str | os.PathLike) -> dict:
    return STORE.read_tensors(directory)


def load_gates(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the gates saved in ``directory`` to ``model`` (in place; also returned)."""
    config = read_gate_config(directory)
    state = read_gate_weights(directory)
    gates = add_gates(model, config["kind"], init_bias=float(config.get("init_bias", 0.0)), layers=config["layers"])
    try:
        for g in gates:
            prefix = f"layers.{g.layer}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            expected = g.state_dict()
            missing = sorted(set(expected) - set(own))
            if missing:
                raise UserError(f"{Path(directory) / WEIGHTS} lacks {prefix}{missing[0]}: it does not match {CONFIG}")
            for name, t in own.items():
                if name not in expected:
                    raise UserError(f"{Path(directory) / WEIGHTS} has an unexpected tensor {prefix}{name}")
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise UserError(f"{Path(directory) / WEIGHTS}: {prefix}{name} has shape {tuple(t.shape)}, the model's "
                                    f"gate needs {tuple(expected[name].shape)} (saved from another architecture?)")
            g.load_state_dict(own)
        extra = {k.split(".")[1] for k in state} - {str(g.layer) for g in gates}
        if extra:
            raise UserError(f"{Path(directory) / WEIGHTS} has gates for layers {sorted(extra)} not in {CONFIG}")
    except UserError:
        remove_gates(model)
        raise
    return model
