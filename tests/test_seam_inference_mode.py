"""The seam works under torch.inference_mode (tensors without version counters) and gives the same statistics."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from attnkit.seam import StatsCollector, attach


def test_statistics_equal_under_inference_mode_and_no_grad():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    results = []
    for context in (torch.no_grad, torch.inference_mode):
        stats = StatsCollector()
        with context(), attach(model, taps=[stats]) as session:
            session.query_mask = mask.bool()
            for _ in range(2):  # the second forward hits the per-mask caches
                model(input_ids=ids, attention_mask=mask)
        results.append(stats.heads())
    for a, b in zip(*results):
        assert a["rows"] == b["rows"] > 0
        assert abs(a["entropy"] - b["entropy"]) < 1e-6
