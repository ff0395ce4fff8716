"""``sinks_window``: StreamingLLM — the first block(s) as attention sinks plus the local blocks.

Xiao et al. 2023: a window without the first tokens destroys perplexity (5158 vs 5.40 with 4
sink tokens); keeping them restores it. The forced blocks are the one window's
``sink_window(sink_blocks, local_blocks - 1)`` mask modifier on block numbers
(``BlockGeometry.forced``). At density d the budget ⌈d·(i+1)⌉ is the sinks plus the most recent
blocks (below: 2 of 4 blocks for the last query block, the sink and its own).

    >>> import torch
    >>> from attnkit.sparse import BlockGeometry, BlockInputs, select_blocks
    >>> from attnkit.sparse.patterns.sinks_window import sinks_window_score
    >>> geo = BlockGeometry(block_size=2, query_length=8, key_length=8)
    >>> x = BlockInputs(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), geo, groups=1)
    >>> select_blocks(sinks_window_score(x), geo, geo.forced(1, 1, sinks=True), 0.5).block_mask()[0, 0].int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 0, 1, 0],
            [1, 0, 0, 1]], dtype=torch.int32)
"""

from __future__ import annotations

from torch import Tensor

from attnkit.sparse.patterns.base import BlockInputs, Pattern
from attnkit.sparse.patterns.window import window_score


def sinks_window_score(x: BlockInputs) -> Tensor:
    """The window's recency score; the sinks are forced by ``select_blocks``."""
    return window_score(x)


PATTERN = Pattern("sinks_window", sinks_window_score, sinks=True)
