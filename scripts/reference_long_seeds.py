"""Did an induction head form, and does it copy from far back? reference-long runs, by checkpoint.

    python scripts/train_reference_long.py --out runs/rl_seed3 --seed 3 --no-card     # a run per seed
    python scripts/reference_long_seeds.py runs/rl_seed3_ck/checkpoint-2000 runs/rl_seed3 ...
    python scripts/reference_long_seeds.py --card runs/rl_seed3          # + the card's copy and window figures

Induction: on a random sequence of 48 tokens repeated once (fits the 128-token windows of the first
stage) and of 256 (the 1024-token stage), through attnkit's seam (``measure_head_roles``). With
``--card``: the model card's own measurements (scripts/reference_long_card.py) of the copy gain on
held-out natural passages 512-896 tokens apart, the test loss, and its margin over a 128-token window.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def card_figures(model, test_ids: torch.Tensor, bos: int) -> dict[str, float]:
    from reference_long_card import CONTEXT, WINDOW, copy_gain, copy_samples, test_blocks, token_nll, windowed_nll

    from attnkit.seam.mods.mask import local_window

    blocks = test_blocks(test_ids, CONTEXT, bos)
    full = token_nll(model, blocks)
    window = windowed_nll(model, blocks, local_window(WINDOW - 1))
    return {"natural copy 512+": copy_gain(model, copy_samples(test_ids, bos))["gain"],
            "test NLL": float(full.mean()), "window margin": float(window.mean() - full.mean())}


def main() -> int:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train_reference_long import random_repeat_roles

    from attnkit.common.data import encode_documents, load_corpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="HF model directories (a run's output or its checkpoints)")
    p.add_argument("--card", action="store_true", help="also the card's copy gain 512+, test NLL and window margin")
    args = p.parse_args()
    torch.set_num_threads(1)
    table = Table("best induction 48 / 256", "copy gain 48 / 256 (nats)", "best previous-token")
    card_columns = ("natural copy 512+", "test NLL", "window margin")
    for c in card_columns if args.card else ():
        table.add_column(c)
    table.add_column("model", overflow="fold")
    test_ids = None
    for path in args.runs:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        bos = model.config.bos_token_id
        roles = [random_repeat_roles(model, model.config.vocab_size, bos, length) for length in (48, 256)]
        row = [" / ".join(f"{r.best('induction').induction:.2f}" for r in roles),
               " / ".join(f"{r.copy_gain:.2f}" for r in roles),
               f"{roles[0].best('previous_token').previous_token:.2f}"]
        if args.card:
            if test_ids is None:
                test_ids = encode_documents(AutoTokenizer.from_pretrained(path), load_corpus("kjv").splits["test"])
            figures = card_figures(model, test_ids, bos)
            row += [f"{figures[c]:.3f}" for c in card_columns]
        table.add_row(*row, path)
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
