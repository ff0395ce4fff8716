"""``attnkit.sparse``: block-sparse attention for pretrained models, training-free or with a learned gate.

    from attnkit.sparse import SparseConfig, PATTERNS, make_gates, sparse_attention

    cfg = SparseConfig(pattern="learned_gate", density=0.25, block_size=64)
    gates = make_gates(model, cfg)               # None for training-free patterns
    with sparse_attention(model, cfg, gates=gates) as handle:
        out = model(input_ids=ids)               # block-sparse through the seam; model restored on exit
        handle.density()                         # measured share of candidate key blocks kept
        handle.gate_log_probs                    # {Site: (B, Hkv, nQb, nKb)} for a pooled-map loss

Pieces: ``config`` (SparseConfig), ``blocks`` (block geometry, selection, pooling),
``patterns/`` (the registry, a file each), ``gates`` (trainable gates beside the model),
``attention`` (the seam session and kernel entry). The block-sparse kernels are the seam's
(``attnkit.seam.kernels.block_kernels``): ``gather_sdpa`` (SDPA on the gathered blocks, the CPU
default), ``block_attention`` (the portable gather kernel, any call), ``flex_block`` (FlexAttention).
"""

from attnkit.sparse.attention import SparseHandle, choose_blocks, sparse_attention
from attnkit.seam.kernels.block_attention import block_sparse_attention, dense_reference
from attnkit.seam.kernels.blocks import BlockGeometry, BlockSelection, select_blocks
from attnkit.seam.kernels.gather_sdpa import gather_sdpa_attention
from attnkit.sparse.config import SparseConfig
from attnkit.sparse.gates import BlockGate, SparseGates, make_gates
from attnkit.sparse.patterns import PATTERNS, BlockInputs, Pattern, register_pattern

__all__ = [
    "PATTERNS", "BlockGate", "BlockGeometry", "BlockInputs", "BlockSelection", "Pattern", "SparseConfig", "SparseGates",
    "SparseHandle", "block_sparse_attention", "choose_blocks", "dense_reference", "gather_sdpa_attention", "make_gates", "register_pattern", "select_blocks",
    "sparse_attention",
]
