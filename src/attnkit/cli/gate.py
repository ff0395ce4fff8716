"""``attnkit gate MODEL --kind headwise|elementwise|mlp --out DIR``: add output gates to a model.

DIR gets the model as it was (``save_pretrained``: config, ``model.safetensors``, tokenizer) and,
beside it, the gates alone (``gates.safetensors`` + ``gate_config.json``, see ``attnkit.gate.io``).
``attnkit.gate.load_gated(DIR)`` loads both; the converted model's outputs equal the original's
(checked here on a short input, and printed).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(sub) -> None:
    from attnkit.cli.common import add_device_options
    from attnkit.common.loading.builtin import BUILTIN_MODELS, DEFAULT_MODEL
    from attnkit.gate.kinds import KIND_HELP

    p = sub.add_parser("gate", help="add gated attention (Qiu et al. 2025's G1, or a per-head MLP gate) to a model",
                       description="Add a sigmoid output gate to every attention layer (Y' = Y * sigmoid(gate(X)) before "
                       "the output projection), initialised so the model computes exactly what it did, and save it.",
                       epilog="examples:\n  attnkit gate reference --kind headwise --out gated/\n"
                       "  attnkit gate gated/ --stats --text \"In the beginning God created the heaven.\"")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"built-in name ({', '.join(BUILTIN_MODELS)}), local Hugging Face directory, or hub id")
    p.add_argument("--kind", choices=list(KIND_HELP), default="headwise",
                   help="; ".join(f"{kind}: {what}" for kind, what in KIND_HELP.items()))
    p.add_argument("--out", metavar="DIR", help="directory to write (new or empty)")
    p.add_argument("--stats", action="store_true",
                   help="MODEL is a directory this command wrote: load it and print its gate statistics on --text")
    p.add_argument("--text", help="text for --stats (default: a built-in English passage)")
    p.add_argument("--init-bias", type=float, default=0.0, metavar="B",
                   help="gate bias at initialisation (the output is rescaled by 1/sigmoid(B): still the same model)")
    p.add_argument("--layers", metavar="LIST", help="gate only these layers, e.g. 0,2-3 (default: all)")
    add_device_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from attnkit.cli.common import load_options, parse_int_list
    from attnkit.common.loading.device import model_device
    from attnkit.gate import add_gates, save_gates
    from attnkit.errors import UserError
    from attnkit.common.loading.registry import load_model

    if args.stats:
        return show_stats(args)
    if args.out is None:
        raise UserError("give --out DIR (where the gated model goes), or --stats to read a gated directory")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {args.out} exists and is {'not a directory' if not out.is_dir() else 'not empty'}; "
                        f"give a new or empty directory")
    parent = out.resolve().parent
    if not out.exists() and not (parent.is_dir() and os.access(parent, os.W_OK)):
        raise UserError(f"--out {args.out} cannot be created: {parent} is not a writable directory")
    layers = parse_int_list(args.layers, "layers")
    loaded = load_model(args.model, **load_options(args))
    model = loaded.model
    probe = torch.arange(8).unsqueeze(0) % max(2, getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    probe = probe.to(model_device(model))
    with torch.no_grad():
        before = _first_tensor(model(input_ids=probe))
    gates = add_gates(model, args.kind, init_bias=args.init_bias, layers=layers)
    with torch.no_grad():
        diff = float((_first_tensor(model(input_ids=probe)) - before).abs().max())
    from attnkit.gate import remove_gates

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


def show_stats(args: argparse.Namespace) -> int:
    """Mean gate per head and share of gates below 0.1 of a gated directory, on some text."""
    import torch
    from rich.console import Console

    from attnkit.cli.common import load_options
    from attnkit.common.default_text import DEFAULT_TEXT
    from attnkit.common.loading.device import model_device
    from attnkit.common.tokenize import max_positions, tokenize
    from attnkit.gate import GateStats
    from attnkit.gate import load_gated

    loaded = load_gated(args.model, **load_options(args))
    if loaded.tokenizer is None:
        from attnkit.errors import UserError

        raise UserError(f"{args.model} has no tokenizer to turn text into tokens")
    inputs = tokenize(loaded.tokenizer, args.text or DEFAULT_TEXT, None, max_positions(loaded.model),
                      truncate_silently=args.text is None, device=model_device(loaded.model))
    with torch.no_grad(), GateStats(loaded.model) as gs:
        loaded.model(**inputs)
    console = Console()
    s = gs.summary()
    console.print(f"gates of {args.model}: mean {s['mean_gate']:.3f}, share below 0.1 {s['share_below_0_1']:.3f} "
                  f"over {s['heads']} heads", highlight=False, markup=False, soft_wrap=True)
    for h in gs.heads():
        console.print(f"  layer {h['layer']} head {h['head']}: mean gate {h['mean_gate']:.3f}, "
                      f"below 0.1 {h['share_below_0_1']:.3f}", highlight=False, markup=False)
    return 0


def _first_tensor(output):
    for key in ("logits", "last_hidden_state"):
        t = getattr(output, key, None)
        if t is not None:
            return t
    return output[0]
