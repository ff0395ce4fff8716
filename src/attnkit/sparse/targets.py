"""The gate's training target: the dense model's attention map, pooled into blocks.

For each attention site of a dense forward, ``PooledMapTarget`` (a tap) keeps one number per
(query block i, key block j), by one of the ``REDUCTIONS``:

    "max"   pooled[b, h, i, j] = max over query rows of block i and keys of block j of P_dense[b, h, row, key]
            (SeerAttention's target: the block's single strongest entry)
    "mass"  pooled[b, h, i, j] = sum over the same rows and keys of P_dense[b, h, row, key]
            (the attention mass the query block puts on the key block: what dropping it removes)

chunk by chunk of query rows as the seam's observation pass hands them over: nothing of size
T × T outlives a chunk (the tap holds (B, H, nQb, nKb)). Blocks lie on the grid of
``attnkit.seam.kernels.blocks.BlockGeometry``: query block i and key block i cover the same key
positions. ``target(site, num_kv_heads)`` turns it into what a gate is trained against: the query
heads of a KV group reduced the same way (the heads of a group share their blocks), zero on
blocks the query block may not see, normalised over each row's key blocks. ``map_loss`` is
KL(target ‖ gate) averaged over sites and (batch, KV head, query block) rows.

Why "mass" exists: a gate keeps the top-k blocks of its score, and what a dropped block costs the
output is the probability mass on it. A block with one sharp entry (one key a few rows look at)
ranks high under "max" and can hold little mass; on ``reference-long`` at density 0.25, keeping the
top-k blocks of the true max-pooled map gives a higher perplexity than the top-k by mass, and than
the trained gate itself (``experiments/sparse/quality/README.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.errors import UserError
from attnkit.seam.sites import Site, SiteDict
from attnkit.seam.taps import ObservedChunk, Tap


@dataclass(frozen=True)
class Reduction:
    """How probabilities are pooled: ``pool(x, dim)`` over a block's keys and over a group's heads,
    ``scatter`` (a ``scatter_reduce_`` name) over a query block's rows."""

    name: str
    pool: Callable[[Tensor, int], Tensor]
    scatter: str


REDUCTIONS: dict[str, Reduction] = {r.name: r for r in (
    Reduction("max", lambda x, dim: x.amax(dim), "amax"),
    Reduction("mass", lambda x, dim: x.sum(dim), "sum"),
)}


def get_reduction(name: str) -> Reduction:
    if name not in REDUCTIONS:
        raise UserError(f"unknown map target '{name}' (known: {', '.join(REDUCTIONS)})")
    return REDUCTIONS[name]


def pool_rows(probs: Tensor, block_size: int, key_blocks: int, reduce: str = "max") -> Tensor:
    """(B, H, R, K') probabilities -> (B, H, R, key_blocks): each row's max (or sum, ``reduce="mass"``)
    over the keys of each block.

    K' may be a prefix of the keys (the observation skips keys no row of the chunk sees): missing
    blocks are 0.
    """
    B, H, R, K = probs.shape
    nk = math.ceil(K / block_size)
    padded = F.pad(probs, (0, nk * block_size - K))  # probabilities are >= 0: padding never wins a max, adds 0
    pooled = get_reduction(reduce).pool(padded.view(B, H, R, nk, block_size), -1)
    return F.pad(pooled, (0, key_blocks - nk)) if nk < key_blocks else pooled


class PooledMapTarget(Tap):
    """Block-pooled attention probabilities of every site of each forward (see the module doc);
    ``reduce``: a name in ``REDUCTIONS`` ("max": SeerAttention's, "mass": the block's attention mass).

    pooled[site]: (B, H, nQb, nKb) float32, on the model's device; replaced at each forward.
    """

    accepts_key_prefix = True  # causal calls: only the keys a chunk's rows see are computed

    def __init__(self, block_size: int, reduce: str = "max") -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.reduction = get_reduction(reduce)
        self.pooled: dict[Site, Tensor] = SiteDict()
        self.first_block: dict[Site, int] = SiteDict()

    def start_forward(self) -> None:
        self.pooled, self.first_block = SiteDict(), SiteDict()

    def observe(self, chunk: ObservedChunk) -> None:
        call, bs = chunk.call, self.block_size
        Q, K = call.query_length, call.key_length
        first = (K - Q) // bs  # the key block of query row 0 (0 without a KV cache)
        n_q = (K - 1) // bs - first + 1
        n_k = math.ceil(K / bs)
        probs = chunk.probs * chunk.row_valid[:, None, :, None]  # padding queries teach nothing
        rows = pool_rows(probs.float(), bs, n_k, self.reduction.name)  # (B, h, R, nKb)
        qblock = (chunk.positions // bs - first).to(rows.device)  # (R,)
        site = chunk.site
        if site not in self.pooled:
            B, h = rows.shape[:2]
            self.pooled[site] = torch.zeros(B, h, n_q, n_k, device=rows.device)
            self.first_block[site] = first
        index = qblock.view(1, 1, -1, 1).expand_as(rows)
        self.pooled[site].scatter_reduce_(2, index, rows, reduce=self.reduction.scatter)

    def target(self, site: Site, num_kv_heads: int, causal: bool = True) -> Tensor:
        """(B, Hkv, nQb, nKb) the gate's target distribution over key blocks for each query block."""
        pooled = self.pooled[site]
        B, H, nQ, nK = pooled.shape
        if H % num_kv_heads:
            raise ValueError(f"{H} query heads do not fall into {num_kv_heads} KV groups")
        grouped = self.reduction.pool(pooled.view(B, num_kv_heads, H // num_kv_heads, nQ, nK), 2)
        if causal:
            qb = torch.arange(nQ, device=pooled.device)[:, None] + self.first_block[site]
            kb = torch.arange(nK, device=pooled.device)[None, :]
            grouped = grouped * (kb <= qb)
        return grouped / grouped.sum(-1, keepdim=True).clamp_min(1e-30)


def block_kl(target: Tensor, log_probs: Tensor) -> Tensor:
    """Mean over rows of KL(target ‖ exp(log_probs)), rows (…, nKb); blocks with target 0 add nothing
    (also where log_probs is -inf: a block the gate may not choose); rows whose target is all 0 (a
    padding-only block) count as 0."""
    t = target.to(log_probs.dtype)
    terms = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - log_probs), torch.zeros_like(t))
    return terms.sum(-1).mean()


def map_loss(gate_log_probs: dict[Site, Tensor], targets: PooledMapTarget, causal: bool = True) -> Tensor:
    """SeerAttention's loss: KL(pooled dense map ‖ gate) averaged over the gated sites."""
    if not gate_log_probs:
        raise ValueError("no gate scores in this forward: is the pattern a learned one?")
    losses = []
    for site, lp in gate_log_probs.items():
        losses.append(block_kl(targets.target(site, lp.shape[1], causal), lp))
    return torch.stack(losses).mean()
