"""``learned_gate``: SeerAttention-style trainable gate per KV group, on pooled Q and K.

Gao et al. 2024 (SeerAttention): pool Q of a query block (mean) and K of a key block (max, min,
mean), project both with small linear layers, and score key blocks by their dot product; keep
the top-k. Here one gate per KV group (its query heads' pooled queries concatenated), the sinks
and the local block always kept; ``attnkit.sparse.gates.BlockGate`` holds the weights
(``make_gates``). The gate starts uniform (query projection zero), so at first it keeps what
``sinks_window`` keeps (ties go to recent blocks) and the output is exactly block-sparse
attention over those blocks; training moves it.

    >>> import torch
    >>> from attnkit.sparse import BlockGate, BlockGeometry, BlockInputs
    >>> from attnkit.sparse.patterns.learned_gate import learned_gate_score
    >>> geo = BlockGeometry(block_size=2, query_length=6, key_length=6)
    >>> gate = BlockGate(num_kv_heads=1, groups=1, head_dim=4, gate_dim=8)
    >>> x = BlockInputs(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), geo, groups=1, gate=gate)
    >>> learned_gate_score(x).shape                  # (B, Hkv, nQb, nKb), differentiable in the gate
    torch.Size([1, 1, 3, 3])
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.sparse.patterns.base import BlockInputs, Pattern


def learned_gate_score(x: BlockInputs) -> Tensor:
    if x.gate is None:
        raise ValueError("the learned_gate pattern needs gates: sparse_attention(model, cfg, gates=make_gates(model, cfg))")
    mean, hi, lo = x.key_stats
    return x.gate(x.query_means, torch.cat([hi, lo, mean], dim=-1))


PATTERN = Pattern("learned_gate", learned_gate_score, sinks=True, learned=True)
