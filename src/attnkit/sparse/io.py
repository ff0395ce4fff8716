"""Gates saved adapter-style: ``sparse_gates.safetensors`` + ``sparse_config.json``, nothing pickled.

    save_gates(gates, cfg, "out/")               # both files, each whole or not at all
    gates, cfg = load_gates(model, "out/")       # gates for a model of the same architecture

A missing, truncated or corrupted file, or gates that do not fit the model (other sites or
shapes), is a ``UserError`` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from attnkit.errors import UserError
from attnkit.sparse.config import SparseConfig
from attnkit.sparse.gates import SparseGates, make_gates

WEIGHTS = "sparse_gates.safetensors"
CONFIG = "sparse_config.json"
FORMAT = "attnkit-sparse-gates/1"


def save_gates(gates: SparseGates, cfg: SparseConfig, directory: str | os.PathLike) -> Path:
    """Write ``gates`` and ``cfg`` to ``directory`` (created)."""
    from safetensors.torch import save

    from attnkit.common.io import write_atomic

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in gates.state_dict().items()}
    write_atomic(out / WEIGHTS, save(tensors, metadata={"format": FORMAT}))
    doc = {"format": FORMAT, "config": cfg.to_dict(), "sites": [list(s) for s in gates.sites]}
    write_atomic(out / CONFIG, json.dumps(doc, indent=2) + "\n")
    return out


def read_config(directory: str | os.PathLike) -> SparseConfig:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise UserError(f"{path} is missing: {directory} is not a directory of attnkit sparse gates")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e.__class__.__name__}); it is truncated or corrupted") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("config"), dict):
        raise UserError(f"{path} is not an attnkit sparse-gates config (format {FORMAT})")
    try:
        return SparseConfig.from_dict(doc["config"])
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None


def load_gates(model: nn.Module, directory: str | os.PathLike) -> tuple[SparseGates, SparseConfig]:
    """The gates saved in ``directory``, made for ``model``, and their config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_config(directory)
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); it is truncated or corrupted") from None
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
