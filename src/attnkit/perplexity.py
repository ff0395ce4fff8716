"""Perplexity of a causal language model on a token stream, and a unigram baseline.

Definition used everywhere in attnkit (the CLI, the reference model's card, the tests):
the stream is cut into non-overlapping blocks (``attnkit.common.data.split_blocks``); inside each
block every token but the first is predicted from the tokens before it in that block;
perplexity = exp(mean negative log-likelihood over all those predicted tokens). Blocks do not
see each other, so the first tokens of each block are predicted from little context: a
sliding window would give a lower number at many times the cost.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from attnkit.common.data.blocks import batched_blocks


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # predicted tokens
    blocks: int

    def to_dict(self) -> dict:
        return asdict(self)


def _result(total_nll: float, tokens: int, blocks: int) -> PerplexityResult:
    nll = total_nll / max(tokens, 1)
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=tokens, blocks=blocks)


@torch.inference_mode()
def evaluate_perplexity(
    model: torch.nn.Module,
    blocks: Sequence[torch.Tensor],
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` (a HF causal LM) over ``blocks``; ``on_batch(n)`` after each batch of n blocks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for batch in batched_blocks(blocks, batch_size):
            batch = batch.to(device)
            # An all-ones mask: blocks are never padded (it also silences HF's padding warning).
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[:, :-1].float()
            # Sum in float64: 10^5 tokens of float32 sums lose the last digit the card reports.
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll.double())
            tokens += batch[:, 1:].numel()
            if on_batch is not None:
                on_batch(batch.size(0))
    finally:
        model.train(was_training)
    return _result(total, tokens, len(blocks))


def unigram_perplexity(train_ids: torch.Tensor, blocks: Sequence[torch.Tensor], vocab_size: int) -> PerplexityResult:
    """Add-one-smoothed unigram model fit on ``train_ids``, scored on the same tokens a model predicts."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    targets = torch.cat([b[1:] for b in blocks])
    return _result(float(-logp[targets].sum()), targets.numel(), len(blocks))
