"""``attnkit gate MODEL --kind headwise|elementwise|mlp --out DIR``: add output gates to a model.

DIR gets the model as it was (``save_pretrained``: config, ``model.safetensors``, tokenizer) and,
beside it, the gates alone (``gates.safetensors`` + ``gate_config.json``, see ``attnkit.edits.io``).
``attnkit.edits.io.load_gated(DIR)`` loads both; the converted model's outputs equal the original's
(checked here on a short input, and printed).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(sub) -> None:
    from attnkit.edits.gating import GATE_KINDS
    from attnkit.models.registry import BUILTIN_MODELS, DEFAULT_MODEL

    p = sub.add_parser("gate", help="add gated attention (Qiu et al. 2025's G1, or seed 000's MLP gate) to a model",
                       description="Add a sigmoid output gate to every attention layer (Y' = Y * sigmoid(gate(X)) before "
                       "the output projection), initialised so the model computes exactly what it did, and save it.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"built-in name ({', '.join(BUILTIN_MODELS)}), local Hugging Face directory, or hub id")
    p.add_argument("--kind", choices=list(GATE_KINDS), default="headwise",
                   help="headwise: one gate per head; elementwise: one per element; mlp: seed 000's per-head MLP")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty)")
    p.add_argument("--init-bias", type=float, default=0.0, metavar="B",
                   help="gate bias at initialisation (the output is rescaled by 1/sigmoid(B): still the same model)")
    p.add_argument("--layers", metavar="LIST", help="gate only these layers, e.g. 0,2-3 (default: all)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from attnkit.cli.common import parse_int_list
    from attnkit.edits import add_gates, save_gates
    from attnkit.errors import UserError
    from attnkit.models.registry import load_model

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {args.out} exists and is {'not a directory' if not out.is_dir() else 'not empty'}; "
                        f"give a new or empty directory")
    parent = out.resolve().parent
    if not out.exists() and not (parent.is_dir() and os.access(parent, os.W_OK)):
        raise UserError(f"--out {args.out} cannot be created: {parent} is not a writable directory")
    layers = parse_int_list(args.layers, "layers")
    loaded = load_model(args.model)
    model = loaded.model
    probe = torch.arange(8).unsqueeze(0) % max(2, getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    with torch.no_grad():
        before = _first_tensor(model(input_ids=probe))
    gates = add_gates(model, args.kind, init_bias=args.init_bias, layers=layers)
    with torch.no_grad():
        diff = float((_first_tensor(model(input_ids=probe)) - before).abs().max())
    from attnkit.edits import remove_gates

    remove_gates(model)  # the model saved beside the gates is the original
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    add_gates(model, args.kind, init_bias=args.init_bias, layers=layers)
    save_gates(model, out)
    params = sum(p.numel() for g in gates for p in g.parameters())
    Console().print(f"{args.kind} gates on {len(gates)} layers ({params:,} parameters) written to {out}; "
                    f"max |output change| at initialisation {diff:.2e}", highlight=False, markup=False, soft_wrap=True)
    return 0


def _first_tensor(output):
    for key in ("logits", "last_hidden_state"):
        t = getattr(output, key, None)
        if t is not None:
            return t
    return output[0]
