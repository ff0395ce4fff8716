"""``attnkit check`` on the two shipped trained models, against what fp16 / bf16 actually do to their
attention: the check's verdict from the weights (``--measure``'s estimate) beside the largest
relative change of an attention weight (>= 0.01 in fp32) when the whole model runs in that dtype,
eager attention, on KJV test text. Same tolerance as the validation grid: 10 %.

    python experiments/check_trained_models.py
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import attnkit
from attnkit.check.measure import sample_ids
from attnkit.common.loading.registry import load_model

torch.set_num_threads(1)
print("| model | tokens | dtype | check (from the weights) | predicted largest logit | measured largest logit (fp32) | "
      "observed largest weight change | observed |")
print("|---|---|---|---|---|---|---|---|")
for name, tokens in (("reference", 128), ("minilm", 512)):
    loaded = load_model(name, attn_implementation="eager")
    ids = sample_ids(loaded.tokenizer, tokens)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with torch.no_grad():
            runs[dtype] = [a.float() for a in copy.deepcopy(loaded.model).to(dtype)(input_ids=ids, output_attentions=True).attentions]
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        report = attnkit.check(name, seq_len=tokens, dtype=label, measure_pass=True, regions=False)
        worst = max(float(((a - r).abs() / r)[r >= 0.01].max()) for a, r in zip(runs[dtype], runs[torch.float32]))
        print(f"| {name} | {tokens} | {label} | {report.status} | {report.weights[0].estimate.model_max:.3g} | "
              f"{report.measured.comparisons[0].measured:.3g} | {worst:.3f} | {'unsafe' if worst > 0.10 else 'safe'} |")
