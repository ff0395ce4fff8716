"""Block-selection patterns: which key blocks each query block keeps (one small file each).

A pattern scores every (query block, key block) pair; ``attnkit.seam.kernels.blocks.select_blocks``
keeps the forced blocks (the local block; the first "sink" blocks for patterns with
``sinks=True``) and then the best-scored candidates, the same number at a density for every
pattern. New patterns register by name:

    from attnkit.sparse.patterns import PATTERNS, Pattern, register_pattern
    register_pattern(Pattern("strided", score=lambda x: (x.key_blocks() % 4 == 0).float(), sinks=True))
    SparseConfig(pattern="strided", density=0.25)

| name | keeps | score of key block j for query block i |
|---|---|---|
| ``window`` | local | recency (j closest to i) |
| ``sinks_window`` | sinks + local | recency (StreamingLLM) |
| ``moba`` | local | ⟨mean query of i, mean key of j⟩ (MoBA) |
| ``quest`` | local | Σ_d max(q̄_d·kmax_d, q̄_d·kmin_d) (Quest's upper bound) |
| ``learned_gate`` | sinks + local | a trained gate on pooled Q and K (SeerAttention) |

Scores of a KV group are summed over its query heads: the heads of a group share their blocks,
so each K/V block is gathered once per group.
"""

from attnkit.sparse.patterns.base import PATTERNS, BlockInputs, Pattern, Score, get_pattern, register_pattern
from attnkit.sparse.patterns import learned_gate, moba, quest, sinks_window, window

for _module in (window, sinks_window, moba, quest, learned_gate):
    register_pattern(_module.PATTERN)

__all__ = ["BlockInputs", "PATTERNS", "Pattern", "Score", "get_pattern", "register_pattern"]
