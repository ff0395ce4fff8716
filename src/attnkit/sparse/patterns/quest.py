"""``quest``: training-free top-k key blocks by Quest's upper bound of q·k over the block.

Quest (Tang et al. 2024) keeps per key block ("page") the element-wise max and min of its keys;
Σ_d max(q_d·kmax_d, q_d·kmin_d) bounds q·k for every key of the block from above. Here q is the
query block's mean query, one bound per query head, summed over the heads of a KV group.
max(q·a, q·b) = relu(q)·a + min(q, 0)·b for a ≥ b, so the bound is two matrix products.

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

from attnkit.seam.kernels.blocks import BlockGeometry, select_blocks  # noqa: F401  (the example)
from attnkit.sparse.patterns.base import BlockInputs, Pattern


def quest_score(x: BlockInputs) -> Tensor:
    q = x.query_means.float()  # (B, Hkv, G, nQb, D)
    B, Hk, G, nQ, D = q.shape
    q = q.reshape(B, Hk, G * nQ, D)  # the group's heads as rows: the key statistics are not copied per head
    _, k_max, k_min = (t.float() for t in x.key_stats)  # (B, Hkv, nKb, D)
    bound = torch.matmul(q.clamp(min=0), k_max.transpose(-1, -2)) + torch.matmul(q.clamp(max=0), k_min.transpose(-1, -2))
    return bound.view(B, Hk, G, nQ, -1).sum(2)  # (B, Hkv, nQb, nKb)


PATTERN = Pattern("quest", quest_score, sinks=False)
