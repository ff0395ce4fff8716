"""Did an induction head form? The best induction score and copy gain of reference-long runs, by checkpoint.

    python scripts/train_reference_long.py --out runs/rl_seed3 --seed 3 --no-card     # a run per seed
    python scripts/reference_long_seeds.py runs/rl_seed3_ck/checkpoint-2000 runs/rl_seed3 ...

On a random sequence of 48 tokens repeated once (fits the 128-token windows of the first stage)
and of 256 (the 1024-token stage), through attnkit's seam (``measure_head_roles``).
"""

from __future__ import annotations

import argparse

import torch


def main() -> int:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from attnkit.analyze.heads import measure_head_roles

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="HF model directories (a run's output or its checkpoints)")
    args = p.parse_args()
    torch.set_num_threads(1)
    table = Table("repeat", "best induction", "copy gain (nats)", "best previous-token")
    table.add_column("model", overflow="fold")
    text = torch.randint(1, 1024, (2, 128), generator=torch.Generator().manual_seed(0))
    for path in args.runs:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        bos = model.config.bos_token_id
        for length in (48, 256):
            r = measure_head_roles(model, text, model.config.vocab_size, first_token=bos, exclude={bos},
                                   repeat_length=length, batch=4)
            table.add_row(str(length), f"{r.best('induction').induction:.2f}", f"{r.copy_gain:.2f}",
                          f"{r.best('previous_token').previous_token:.2f}", path)
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
