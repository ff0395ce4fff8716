"""What a sparse pattern is (``Pattern``), what it scores from (``BlockInputs``), and the registry ``PATTERNS``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit.errors import UserError
from attnkit.seam.kernels import paged_cpu
from attnkit.seam.kernels.blocks import BlockGeometry, pooled_key_means, pooled_keys, pooled_queries
from attnkit.seam.kernels.paged_decode import is_padding_mask
from attnkit.seam.kernels.workspace import Workspace, take_or_new

if TYPE_CHECKING:
    from attnkit.sparse.gates import BlockGate


@dataclass
class BlockInputs:
    """What a pattern scores from: one call's queries and keys, in blocks.

    q: (B, H, Q, D) queries; k: (B, Hkv, K, D) keys (one per KV group); groups = H // Hkv.
    gate: the site's trainable gate (learned patterns only).
    key_pages: gives the (mean, max, min) of each key block when they are kept elsewhere (a KV
        cache's, across decoding steps: ``attnkit.sparse.page_stats``); None = pooled from k.
        Called only by patterns that read ``key_stats``.
    workspace: the call's workspace, which the pooled means and a pattern's scores may be carved
        from (``scratch``), for patterns that keep nothing of them (training-free ones); None =
        fresh tensors.
    """

    q: Tensor
    k: Tensor
    geometry: BlockGeometry
    groups: int
    gate: "BlockGate | None" = None
    key_pages: Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None
    workspace: Workspace | None = None

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised temporary of ``shape``, carved from the call's workspace when there is one."""
        return take_or_new(self.workspace, shape, dtype, self.k.device)

    @cached_property
    def query_means(self) -> Tensor:
        """(B, Hkv, G, nQb, D) mean query of each query block, per query head of each group."""
        B, H, Q, D = self.q.shape
        if Q == 1 and self.geometry.n_query_blocks == 1:  # a decoding step: the block's mean is its one query
            return self.q.view(B, H // self.groups, self.groups, 1, D)
        out = self.scratch((B, H, self.geometry.n_query_blocks, D), self.q.dtype)
        return pooled_queries(self.q, self.geometry, out=out).view(B, H // self.groups, self.groups, -1, D)

    @cached_property
    def key_stats(self) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, max, min) of each key block, each (B, Hkv, nKb, D)."""
        return self.key_pages() if self.key_pages is not None else pooled_keys(self.k, self.geometry)

    @cached_property
    def key_means(self) -> Tensor:
        """(B, Hkv, nKb, D) mean of each key block (without the max and min, when pooled from k)."""
        if self.key_pages is not None or "key_stats" in self.__dict__:
            return self.key_stats[0]
        B, Hk, _, D = self.k.shape
        out = self.scratch((B, Hk, self.geometry.n_key_blocks, D), self.k.dtype)
        return pooled_key_means(self.k, self.geometry, out=out)

    def key_blocks(self) -> Tensor:
        """(1, 1, 1, nKb) key-block numbers."""
        return torch.arange(self.geometry.n_key_blocks, device=self.k.device).view(1, 1, 1, -1)

    def query_blocks(self) -> Tensor:
        """(1, 1, nQb, 1) each query block's diagonal key-block number."""
        return self.geometry.query_block_ids.view(1, 1, -1, 1)


Score = Callable[[BlockInputs], Tensor]  # -> (B|1, Hkv|1, nQb, nKb), higher = keep first
# A decoding step's kept pages straight from the inputs (a compiled kernel), (B, Hkv, kept) int64 in
# ``select_step_pages``' order, given (kept, local, first) of ``step_budget``; None where it cannot.
# A pattern with ``masked_steps`` takes the call's padding mask too, as ``allowed=`` ((B|1, 1, 1,
# K' >= K) bool): the pages it hides whole come after every other page, as ``visible_blocks`` ranks them.
StepPages = Callable[..., "Tensor | None"]


def bound_step_pages(x: BlockInputs, upper: Tensor, lower: Tensor, kept: int, local: int, first: int,
                     allowed: Tensor | None = None) -> Tensor | None:
    """A decoding step's pages in one C++ call (``paged_cpu.step_pages``): each free page scored by
    Σ_d max(q_d·upper_d, q_d·lower_d) (upper, lower: (B, Hkv, nKb, D) per page; Quest's bound with the
    pages' max and min, MoBA's q·mean with the mean as both), summed over a KV group's query heads, in
    double; the forced pages first, then the best, ties to the later page; a padding mask ``allowed``
    (B|1, 1, 1, K' >= K) ranks the pages it hides whole last. None where the kernel does not run or
    the mask is not one row per batch row."""
    K = x.k.shape[2]
    if allowed is not None and not (allowed.dtype == torch.bool and is_padding_mask(allowed, K)):
        return None
    if not paged_cpu.supports(x.q, upper, lower) or paged_cpu.load() is None:
        return None
    return paged_cpu.step_pages(x.q, upper, lower, kept, local, first,
                                None if allowed is None else allowed[..., :K], x.geometry.block_size)


@dataclass(frozen=True)
class Pattern:
    """name: registry key; score: see ``Score``; sinks: keeps the first ``sink_blocks`` key
    blocks by default; learned: scores come from a trainable gate (``make_gates``); step_pages: a
    faster way to the same selection for a decoding step (see ``StepPages``), or None;
    masked_steps: its ``step_pages`` takes a padding mask (``allowed=``); without, a masked step's
    pages come from ``score``."""

    name: str
    score: Score
    sinks: bool = False
    learned: bool = False
    step_pages: StepPages | None = None
    masked_steps: bool = False


PATTERNS: dict[str, Pattern] = {}


def register_pattern(pattern: Pattern) -> Pattern:
    """Add ``pattern`` to ``PATTERNS`` under its name (replacing one of that name)."""
    PATTERNS[pattern.name] = pattern
    return pattern


def get_pattern(name: str) -> Pattern:
    if name not in PATTERNS:
        raise UserError(f"unknown sparse pattern '{name}' (known: {', '.join(PATTERNS)})")
    return PATTERNS[name]
