"""Gates saved adapter-style: ``sparse_gates.safetensors`` + ``sparse_config.json``, nothing pickled:
attnkit's one parameter-store format (``attnkit.common.param_store``).

    save_gates(gates, cfg, "out/")               # both files, each whole or not at all
    gates, cfg = load_gates(model, "out/")       # gates for a model of the same architecture

A missing, truncated or corrupted file, or gates that do not fit the model (other sites or
shapes), is a ``UserError`` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from attnkit.common.param_store import ParamStore
from attnkit.errors import UserError
from attnkit.sparse.config import SparseConfig
from attnkit.sparse.gates import SparseGates, make_gates

STORE = ParamStore("sparse_gates.safetensors", "sparse_config.json", "attnkit-sparse-gates/1", "attnkit sparse gates",
                   "attnkit sparse-gates config")
WEIGHTS, CONFIG, FORMAT = STORE.weights, STORE.header, STORE.format


def save_gates(gates: SparseGates, cfg: SparseConfig, directory: str | os.PathLike) -> Path:
    """Write ``gates`` and ``cfg`` to ``directory`` (created)."""
    return STORE.save(directory, gates.state_dict(), {"config": cfg.to_dict(), "sites": [list(s) for s in gates.sites]})


def read_config(directory: str | os.PathLike) -> SparseConfig:
    doc = STORE.read_header(directory)
    path = Path(directory) / CONFIG
    if not isinstance(doc.get("config"), dict):
        raise UserError(f"{path} is not an attnkit sparse-gates config (no 'config' object)")
    try:
        return SparseConfig.from_dict(doc["config"])
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None


def load_gates(model: nn.Module, directory: str | os.PathLike) -> tuple[SparseGates, SparseConfig]:
    """The gates saved in ``directory``, made for ``model``, and their config."""
    cfg = read_config(directory)
    path = Path(directory) / WEIGHTS
    tensors = STORE.read_tensors(directory)
    gates = make_gates(model, cfg)
    if gates is None:
        raise UserError(f"{Path(directory) / CONFIG} names the training-free pattern {cfg.pattern}: there are no gates")
    own = gates.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise UserError(f"{path} does not fit this model's attention sites: "
                        f"missing {missing[:3]}, unexpected {extra[:3]}")
    wrong = [k for k in own if own[k].shape != tensors[k].shape]
    if wrong:
        raise UserError(f"{path} does not fit this model: {wrong[0]} is {tuple(tensors[wrong[0]].shape)}, "
                        f"the model needs {tuple(own[wrong[0]].shape)}")
    gates.load_state_dict(tensors)
    return gates, cfg
