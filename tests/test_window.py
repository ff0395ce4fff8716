"""The one window (attnkit.seam.mods.mask.window) serves both masks and sparse block selection: the blocks
``BlockGeometry.forced`` keeps and the ``window`` pattern's ranking equal a per-block count by hand."""

from __future__ import annotations

import pytest
import torch

from attnkit.seam.mods.mask import local_window, sink_window
from attnkit.seam.kernels.blocks import BlockGeometry
from attnkit.sparse.patterns import BlockInputs
from attnkit.sparse.patterns.window import window_score


def _forced_by_hand(geo: BlockGeometry, sink_blocks: int, local_blocks: int, sinks: bool) -> torch.Tensor:
    out = torch.zeros(geo.n_query_blocks, geo.n_key_blocks, dtype=torch.bool)
    for i, qb in enumerate(geo.query_block_ids.tolist()):
        for kb in range(geo.n_key_blocks):
            if geo.causal and kb > qb:
                continue  # a future block is never a candidate
            recent = (0 <= qb - kb < local_blocks) if geo.causal else abs(qb - kb) < local_blocks
            out[i, kb] = recent or (sinks and kb < sink_blocks)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [(8, 8), (3, 11), (16, 16)])
@pytest.mark.parametrize("sink_blocks,local_blocks", [(0, 1), (1, 1), (2, 3)])
@pytest.mark.parametrize("sinks", [True, False])
def test_forced_blocks_are_the_window_masks_on_blocks(causal, lengths, sink_blocks, local_blocks, sinks):
    geo = BlockGeometry(block_size=2, query_length=lengths[0], key_length=lengths[1], causal=causal)
    assert torch.equal(geo.forced(sink_blocks, local_blocks, sinks), _forced_by_hand(geo, sink_blocks, local_blocks, sinks))


def test_window_pattern_ranks_blocks_by_the_masks_distance():
    geo = BlockGeometry(block_size=2, query_length=8, key_length=8)
    x = BlockInputs(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), geo, groups=1)
    score = window_score(x)[0, 0]  # (nQb, nKb)
    qb, kb = torch.arange(4)[:, None], torch.arange(4)[None, :]
    for w in range(4):  # the blocks a window of w keeps are those scored >= -w
        assert torch.equal(score >= -w, local_window(w)(None, None, qb, kb))
    assert torch.equal(sink_window(1, 0)(None, None, qb, kb), (score == 0) | (kb == 0))
