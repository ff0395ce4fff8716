"""Blocks of one attention call: where they lie, what each query block may keep, and which it keeps.

Tokens are cut into blocks of ``block_size`` by their *position among the keys*, for queries and
keys alike, so query block i and key block i cover the same positions (a KV cache puts the
queries at the end of the keys: the first query block may then start part-way, and is padded in
front). The last block of each side is padded at the end. Padding never gets weight.

    geo = BlockGeometry(block_size=64, query_length=T, key_length=T, causal=True)
    sel = select_blocks(scores, geo, forced=geo.forced(1, 1, sinks=True), density=0.25)
    sel.indices   # (B, Hkv, nQb, S) key-block numbers, the first sel.kept[..] of each row valid

Every pattern hands ``select_blocks`` a score per (query block, key block): the same number of
blocks is kept at a density whatever the pattern, the forced blocks (sinks, local) first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.seam.kernels.workspace import Workspace, take_or_new
from attnkit.seam.mods.mask.window import local_window, sink_window


@dataclass(frozen=True)
class BlockGeometry:
    """The block layout of a call with ``query_length`` queries at the end of ``key_length`` keys."""

    block_size: int
    query_length: int
    key_length: int
    causal: bool = True
    device: torch.device = torch.device("cpu")
    # the tables below, made once per geometry and shared (never modified in place)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def _table(self, key: tuple, make: Callable[[], object]):
        if key not in self._tables:
            self._tables[key] = make()
        return self._tables[key]

    @property
    def offset(self) -> int:
        """Position among the keys of the first query (0 unless a KV cache precedes the queries)."""
        return max(0, self.key_length - self.query_length) if self.causal else 0

    @property
    def front(self) -> int:
        """Padding rows in front of the first query, so query blocks align with key blocks."""
        return self.offset % self.block_size

    @property
    def first_block(self) -> int:
        return self.offset // self.block_size

    @property
    def n_query_blocks(self) -> int:
        return math.ceil((self.front + self.query_length) / self.block_size)

    @property
    def n_key_blocks(self) -> int:
        return math.ceil(self.key_length / self.block_size)

    @property
    def padded_queries(self) -> int:
        return self.n_query_blocks * self.block_size

    @property
    def padded_keys(self) -> int:
        return self.n_key_blocks * self.block_size

    @cached_property
    def query_block_ids(self) -> Tensor:
        """(nQb,) each query block's number in key-block numbering (its diagonal key block)."""
        ids = torch.arange(self.n_query_blocks, device=self.device) + self.first_block
        return ids.clamp(max=self.n_key_blocks - 1)

    @cached_property
    def candidates(self) -> Tensor:
        """(nQb, nKb) bool: key blocks a query block may keep (no future block when causal)."""
        kb = torch.arange(self.n_key_blocks, device=self.device)
        if not self.causal:
            return torch.ones(self.n_query_blocks, self.n_key_blocks, dtype=torch.bool, device=self.device)
        return kb[None, :] <= self.query_block_ids[:, None]

    @cached_property
    def n_candidates(self) -> int:
        """How many (query block, key block) pairs are candidates."""
        return int(self.candidates.sum())

    def forced(self, sink_blocks: int, local_blocks: int, sinks: bool) -> Tensor:
        """(nQb, nKb) bool: blocks always kept: the ``local_blocks`` (>= 1) ending at the query's
        own block (around it, when not causal), and the first ``sink_blocks`` when ``sinks``: the
        window mask modifiers of ``attnkit.seam.mods.mask.window`` on block numbers, within the
        candidates. Made once per geometry (shared: not to be modified)."""
        def make() -> Tensor:
            kb = torch.arange(self.n_key_blocks, device=self.device)[None, :]
            qb = self.query_block_ids[:, None]
            kept = sink_window(sink_blocks, local_blocks - 1) if sinks else local_window(local_blocks - 1)
            return kept(None, None, qb, kb) & self.candidates  # causal: the candidates drop the future half

        return self._table(("forced", sink_blocks, local_blocks, sinks), make)

    def budget(self, density: float, floor: Tensor) -> Tensor:
        """(nQb,) long: blocks each query block keeps: ⌈density · candidates⌉, at least ``floor``
        (nQb,), at most the candidates. The same for every pattern at one density."""
        n = self.candidates.sum(-1)
        k = torch.ceil(n.double() * density - 1e-9).long()
        return torch.minimum(torch.maximum(k, floor), n).clamp(min=1)

    def selection_budget(self, density: float, sink_blocks: int, local_blocks: int,
                         sinks: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(forced (nQb, nKb) bool, budget (nQb,) long, valid (1, 1, nQb, S) bool) of a pattern at
        ``density``: the blocks it always keeps (``forced``), how many each query block keeps (at
        least the sinks and local blocks, whether the pattern forces the sinks or not: at one
        density every pattern keeps as many), and which of S = the most any keeps are used. Made
        once per geometry (shared: not to be modified)."""
        def make() -> tuple[Tensor, Tensor, Tensor]:
            forced = self.forced(sink_blocks, local_blocks, sinks)
            floor = self.forced(sink_blocks, local_blocks, sinks=True).sum(-1)
            budget = self.budget(density, torch.maximum(floor, forced.sum(-1)))
            return forced, budget, _used_slots(budget)

        return self._table(("budget", density, sink_blocks, local_blocks, sinks), make)

    def query_positions(self) -> Tensor:
        """(nQb, bs) each padded query row's position among the keys."""
        start = self.first_block * self.block_size
        return (start + torch.arange(self.padded_queries, device=self.device)).view(self.n_query_blocks, self.block_size)


@lru_cache(maxsize=4)
def block_geometry(block_size: int, query_length: int, key_length: int, causal: bool = True,
                   device: torch.device = torch.device("cpu")) -> BlockGeometry:
    """The ``BlockGeometry`` of a layout, one object per layout in this process (the last few
    layouts): the calls that share it (a model's layers, the steps of a training run) share its
    tables rather than each making them again. A few, as a layout's tables grow with the square of
    its blocks (2 MiB at 128k tokens in blocks of 128)."""
    return BlockGeometry(block_size, query_length, key_length, causal, device)


def _used_slots(budget: Tensor) -> Tensor:
    """(1, 1, nQb, S) bool: slot s of query block i is used when s < budget[i]; S = the largest budget."""
    return (torch.arange(int(budget.max()), device=budget.device) < budget[:, None])[None, None]


def block_number_dtype(count: int) -> torch.dtype:
    """The smallest integer type that holds block numbers 0 … count - 1 (int16 below 32,768, else int32):
    what is kept of a selection between calls, not what kernels index with."""
    return torch.int16 if count <= torch.iinfo(torch.int16).max else torch.int32


@dataclass
class BlockSelection:
    """The key blocks each (batch, KV head, query block) keeps.

    indices: (B, Hkv, nQb, S) key-block numbers (long; int16/int32 in a ``compact`` record), S = the
        most any row keeps; slot s of a row is used when ``valid`` (the first ``kept`` slots, forced
        blocks first, then by score).
    valid: (B|1, Hkv|1, nQb, S) bool.
    log_probs: (B, Hkv, nQb, nKb) the gate's log-probability of each key block (-inf where not a
        candidate), for learned patterns; None otherwise.
    every_slot: every slot of every row is used (``valid`` all True), known without looking (a
        decoding step's selection).
    """

    indices: Tensor
    valid: Tensor
    geometry: BlockGeometry
    log_probs: Tensor | None = None
    every_slot: bool = False
    _mask: Tensor | None = field(default=None, init=False, repr=False, compare=False)  # block_mask(), once made

    @property
    def all_valid(self) -> bool:
        """Whether every slot of every row is used."""
        return self.every_slot or bool(self.valid.all())

    @property
    def slots(self) -> int:
        return self.indices.shape[-1]

    def block_mask(self) -> Tensor:
        """(B, Hkv, nQb, nKb) bool: True where the key block is kept (made once, on first use)."""
        if self._mask is None:
            B, Hk, nQ, S = self.indices.shape
            mask = torch.zeros(B, Hk, nQ, self.geometry.n_key_blocks, dtype=torch.bool, device=self.indices.device)
            self._mask = mask.scatter_(-1, self.indices.long(), self.valid.expand(B, Hk, nQ, S))
        return self._mask

    def compact(self) -> BlockSelection:
        """The same selection with its block numbers in the smallest integer type that holds them
        (int16 below 32,768 key blocks, a quarter of int64's memory): what is kept of a call after
        it returns (a record for ``block_mask``), not what kernels take."""
        out = BlockSelection(self.indices.to(block_number_dtype(self.geometry.n_key_blocks)), self.valid, self.geometry,
                             self.log_probs, self.every_slot)
        out._mask = self._mask
        return out

    def kept_blocks(self) -> int:
        """Kept (query block, key block) pairs, over batch and KV heads."""
        if self.every_slot:
            return self.indices.numel()
        B, Hk = self.indices.shape[:2]
        b, h = self.valid.shape[:2]  # valid is broadcast over the batch / KV heads where 1
        return int(self.valid.sum()) * (B // b) * (Hk // h)

    def candidate_blocks(self) -> int:
        B, Hk = self.indices.shape[:2]
        return self.geometry.n_candidates * B * Hk


def select_blocks(scores: Tensor, geo: BlockGeometry, forced: Tensor, density: float,
                  floor: Tensor | None = None) -> BlockSelection:
    """Keep, per row of ``scores`` (B, Hkv, nQb, nKb), the forced blocks and then the best-scored
    candidates up to the row's budget (``BlockGeometry.budget``; ``floor``: its minimum per row,
    by default the forced blocks' count). Ties go to the more recent block (so a constant score
    is a sliding window), which also makes the choice deterministic."""
    budget = geo.budget(density, forced.sum(-1) if floor is None else torch.maximum(floor, forced.sum(-1)))
    return keep_best(scores, geo, forced, _used_slots(budget))


def keep_best(scores: Tensor, geo: BlockGeometry, forced: Tensor, valid: Tensor,
              workspace: Workspace | None = None) -> BlockSelection:
    """``select_blocks`` with its budget as the used slots ``valid`` (1, 1, nQb, S) (one of
    ``BlockGeometry.selection_budget``'s tables). ``workspace``: where the scores' copy and their
    sort order are written (fresh tensors without one); the selection itself is always fresh."""
    scores = scores.detach().float()  # (B, Hkv, nQb, nKb), maybe an expanded view
    # one copy of the scores (they may be a pattern's output, or an expanded view), then in place
    shape = tuple(torch.broadcast_shapes(scores.shape, geo.candidates.shape))  # where= writes this shape
    copy = take_or_new(workspace, shape, torch.float32, scores.device)
    torch.where(geo.candidates, scores, scores.new_full((), -math.inf), out=copy).masked_fill_(forced, math.inf)
    torch.nan_to_num_(copy, nan=-1e30, posinf=math.inf, neginf=-math.inf)
    # best first, the later of two equal blocks first: a stable ascending sort read backwards (the
    # sorted values overwrite the copy: no second one)
    order = take_or_new(workspace, tuple(copy.shape), torch.long, copy.device)
    torch.sort(copy, dim=-1, stable=True, out=(copy, order))
    indices = order[..., -valid.shape[-1]:].flip(-1)  # a copy: the selection outlives the workspace's views
    return BlockSelection(indices=indices, valid=valid, geometry=geo)


# --- pooling: one vector (or three) per block ---------------------------------------------------

def pooled_queries(q: Tensor, geo: BlockGeometry, out: Tensor | None = None) -> Tensor:
    """(B, H, nQb, D) mean query of each query block, over its real (unpadded) rows; written into
    ``out`` (of that shape and q's dtype) when given and the queries fill whole blocks."""
    B, H, Q, D = q.shape
    bs = geo.block_size
    if geo.front == 0 and geo.padded_queries == Q:  # whole blocks: a view, no padded copy
        return torch.sum(q.reshape(B, H, -1, bs, D), 3, out=out).div_(bs)
    padded = F.pad(q, (0, 0, geo.front, geo.padded_queries - geo.front - Q))
    rows = torch.zeros(geo.padded_queries, device=q.device, dtype=q.dtype)
    rows[geo.front: geo.front + Q] = 1
    count = rows.view(-1, bs).sum(-1).clamp(min=1)  # (nQb,)
    return padded.view(B, H, -1, bs, D).sum(3) / count[:, None]


def pooled_key_means(k: Tensor, geo: BlockGeometry, out: Tensor | None = None) -> Tensor:
    """(B, Hkv, nKb, D) mean of each key block's real keys (``pooled_keys``' first part alone);
    written into ``out`` (of that shape and k's dtype) when given and the keys fill whole blocks."""
    B, H, K, D = k.shape
    bs = geo.block_size
    pad = geo.padded_keys - K
    if pad == 0:  # whole blocks: a view, no padded copy
        return torch.sum(k.reshape(B, H, -1, bs, D), 3, out=out).div_(bs)
    count = torch.full((geo.n_key_blocks,), float(bs), device=k.device, dtype=k.dtype)
    count[-1] = bs - pad
    return F.pad(k, (0, 0, 0, pad)).view(B, H, -1, bs, D).sum(3) / count[:, None]


def pooled_keys(k: Tensor, geo: BlockGeometry) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, max, min) of each key block's real keys, each (B, Hkv, nKb, D)."""
    B, H, K, D = k.shape
    bs = geo.block_size
    pad = geo.padded_keys - K
    blocks = F.pad(k, (0, 0, 0, pad)).view(B, H, -1, bs, D)
    count = torch.full((geo.n_key_blocks,), float(bs), device=k.device, dtype=k.dtype)
    count[-1] = bs - pad
    mean = blocks.sum(3) / count[:, None]
    if pad:
        real = (torch.arange(geo.padded_keys, device=k.device) < K).view(-1, bs)[None, None, :, :, None]
        hi = blocks.masked_fill(~real, -math.inf).amax(3)
        lo = blocks.masked_fill(~real, math.inf).amin(3)
    else:
        hi, lo = blocks.amax(3), blocks.amin(3)
    return mean, hi, lo
