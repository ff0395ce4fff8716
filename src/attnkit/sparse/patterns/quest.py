"""``quest``: training-free top-k key blocks by Quest's upper bound of q·k over the block.

Quest (Tang et al. 2024) keeps per key block ("page") the element-wise max and min of its keys;
Σ_d max(q_d·kmax_d, q_d·kmin_d) bounds q·k for every key of the block from above. Here q is the
query block's mean query, one bound per query head, summed over the heads of a KV group.
max(q·a, q·b) = relu(q)·a + min(q, 0)·b for a ≥ b, so the bound is two matrix products, and
linear in relu(q) and min(q, 0): a group's sum over its heads is the bound of the heads' summed
parts, one row per query block (a decoding step: one row per KV group) against the pages.

    >>> import torch
    >>> from attnkit.sparse import BlockGeometry, BlockInputs, select_blocks
    >>> from attnkit.sparse.patterns.quest import quest_score
    >>> geo = BlockGeometry(block_size=2, query_length=6, key_length=6)
    >>> q = torch.ones(1, 1, 6, 1); k = torch.tensor([0., 0., 9., -9., 1., 1.]).view(1, 1, 6, 1)
    >>> x = BlockInputs(q, k, geo, groups=1)
    >>> select_blocks(quest_score(x), geo, geo.forced(0, 1, sinks=False), 0.5).block_mask()[0, 0].int()
    tensor([[1, 0, 0],
            [0, 1, 0],
            [0, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.sparse.patterns.base import BlockInputs, Pattern, bound_step_pages


def quest_score(x: BlockInputs) -> Tensor:
    q = x.query_means.float()  # (B, Hkv, G, nQb, D)
    up, down = q.clamp(min=0).sum(2), q.clamp(max=0).sum(2)  # (B, Hkv, nQb, D) summed over the group's heads
    _, k_max, k_min = (t.float() for t in x.key_stats)  # (B, Hkv, nKb, D)
    return torch.matmul(up, k_max.transpose(-1, -2)).add_(torch.matmul(down, k_min.transpose(-1, -2)))  # (B, Hkv, nQb, nKb)


def quest_step_pages(x: BlockInputs, kept: int, local: int, first: int, allowed: Tensor | None = None) -> Tensor | None:
    """A decoding step's pages by the same bound, in one C++ call (``bound_step_pages``: the scores
    in double, where ``quest_score`` sums in float32, so two pages whose bounds differ by float32
    rounding only may be kept in the other order)."""
    _, k_max, k_min = x.key_stats
    return bound_step_pages(x, k_max, k_min, kept, local, first, allowed)


PATTERN = Pattern("quest", quest_score, sinks=False, step_pages=quest_step_pages, masked_steps=True)
