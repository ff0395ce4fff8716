"""``window``: the local blocks only — the query's own block and the most recent before it.

At density d a query block keeps its ⌈d·(i+1)⌉ most recent key blocks: a sliding window of
blocks with no sink (StreamingLLM shows what losing the first tokens costs). Recency is the one
window's ``key_distance`` (``attnkit.seam.mods.mask.window``) evaluated on block numbers.

    >>> import torch
    >>> from attnkit.sparse import BlockGeometry, BlockInputs, select_blocks
    >>> from attnkit.sparse.patterns.window import window_score
    >>> geo = BlockGeometry(block_size=2, query_length=8, key_length=8)
    >>> x = BlockInputs(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), geo, groups=1)
    >>> select_blocks(window_score(x), geo, geo.forced(1, 1, sinks=False), 0.5).block_mask()[0, 0].int()
    tensor([[1, 0, 0, 0],
            [0, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

from torch import Tensor

from attnkit.seam.mods.mask.window import key_distance
from attnkit.sparse.patterns.base import BlockInputs, Pattern


def window_score(x: BlockInputs) -> Tensor:
    """-distance between the query block and the key block: nearer is better."""
    return -key_distance(x.query_blocks(), x.key_blocks()).float()


PATTERN = Pattern("window", window_score, sinks=False)
