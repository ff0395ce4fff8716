"""``moba``: training-free top-k key blocks by ⟨mean query of the query block, mean key of the key block⟩.

MoBA (Lu et al. 2025) scores each key block by q·mean(K_block) and keeps the top-k, the current
block always. Here the query is the query block's mean (one selection per query block, so the
kept K/V blocks are gathered once per block) and the score is summed over the query heads of a
KV group (the group shares its blocks).

    >>> import torch
    >>> from attnkit.sparse import BlockGeometry, BlockInputs, select_blocks
    >>> from attnkit.sparse.patterns.moba import moba_score
    >>> geo = BlockGeometry(block_size=2, query_length=6, key_length=6)
    >>> q = torch.ones(1, 1, 6, 1); k = torch.tensor([5., 5., -1., -1., 0., 0.]).view(1, 1, 6, 1)
    >>> x = BlockInputs(q, k, geo, groups=1)
    >>> select_blocks(moba_score(x), geo, geo.forced(0, 1, sinks=False), 0.5).block_mask()[0, 0].int()
    tensor([[1, 0, 0],
            [0, 1, 0],
            [1, 0, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.sparse.patterns.base import BlockInputs, Pattern, bound_step_pages


def moba_score(x: BlockInputs) -> Tensor:
    means = x.query_means.float()  # (B, Hkv, G, nQb, D)
    B, Hk, _, nQ, D = means.shape
    q = torch.sum(means, 2, out=x.scratch((B, Hk, nQ, D), torch.float32))  # the group's heads summed
    k_mean = x.key_means.float()  # (B, Hkv, nKb, D)
    scores = x.scratch((B, Hk, nQ, k_mean.shape[2]), torch.float32)
    return torch.matmul(q, k_mean.transpose(-1, -2), out=scores)  # (B, Hkv, nQb, nKb)


def moba_step_pages(x: BlockInputs, kept: int, local: int, first: int, allowed: Tensor | None = None) -> Tensor | None:
    """A decoding step's pages by the same score in one C++ call: Quest's bound with each page's mean
    key as both its max and min is Σ_d q_d·mean_d (``bound_step_pages``, in double where
    ``moba_score`` sums in float32: two pages whose scores differ by float32 rounding only may be kept
    in the other order)."""
    mean, _, _ = x.key_stats
    return bound_step_pages(x, mean, mean, kept, local, first, allowed)


PATTERN = Pattern("moba", moba_score, sinks=False, step_pages=moba_step_pages, masked_steps=True)
