"""Per-page key statistics kept across the calls of a KV cache, updated where the cache grew.

Quest keeps, for every page (key block) of the cache, the element-wise max and min of its keys;
a decoding step's query scores each page by the upper bound Σ_d max(q_d·kmax_d, q_d·kmin_d)
of q·k over it. Computing those bounds from the whole cache at every step reads every key,
which is what dense attention costs. A step appends one key, and only the last page changes, so
``PageStats`` keeps the (mean, max, min) of each site's pages from call to call and recomputes
only the pages from the first one the new keys touch:

    pages = PageStats()
    mean, hi, lo = pages.update(site, k, block_size=64, past=K - Q)   # each (B, Hkv, nKb, D)

``past`` is how many of the keys k (B, Hkv, K, D) were in the cache before this call (the keys
of the call's own queries follow them). Pages wholly inside the part seen before are reused when
the last of them still ends in the key it ended in (another cache, a beam search's reordered rows
start again from the keys; a prompt is always pooled whole; a cropped cache keeps the pages
before the crop): one small comparison instead of reading every key. The rest are pooled from
the keys. A change the check misses (a
row edited in place between its first and last page) can only make the selection stale, never
the attention: the kernel reads the cache's keys themselves.
What comes back equals ``pooled_keys`` of the whole cache: the max and min exactly, the mean to
its rounding (on the CPU one C++ call pools the pages, ``paged_cpu.pool_pages``, summing in
double; elsewhere ``pooled_keys``' own reductions). Statistics are in the keys' dtype, without
gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.seam.kernels import paged_cpu
from attnkit.seam.kernels.blocks import BlockGeometry, pooled_keys
from attnkit.seam.sites import Site


@dataclass
class _SitePages:
    """One site's pages: buffers of ``capacity`` pages, the first ``pages`` of them filled."""

    block_size: int
    keys: int  # how many keys the filled pages summarise
    stats: Tensor  # (3, B, Hkv, capacity, D): mean, max, min of each page
    marks: Tensor  # (B, Hkv, capacity, D): the last key of each full page, to tell the same cache
    views: tuple[int, tuple[Tensor, Tensor, Tensor]] | None = None  # (pages, the first pages' mean, max, min)

    def fits(self, k: Tensor, block_size: int) -> bool:
        B, Hk, _, D = k.shape
        return (self.block_size == block_size and self.stats.shape[1:3] == (B, Hk) and self.stats.shape[-1] == D
                and self.stats.dtype == k.dtype and self.stats.device == k.device)

    @property
    def capacity(self) -> int:
        return self.stats.shape[3]

    def reserve(self, pages: int) -> None:
        """Room for ``pages`` pages, doubling: a step rarely reallocates."""
        if pages <= self.capacity:
            return
        grow = max(pages, 2 * self.capacity)
        stats = self.stats.new_empty(*self.stats.shape[:3], grow, self.stats.shape[-1])
        marks = self.marks.new_empty(*self.marks.shape[:2], grow, self.marks.shape[-1])
        stats[:, :, :, : self.capacity] = self.stats
        marks[:, :, : self.capacity] = self.marks
        self.stats, self.marks, self.views = stats, marks, None


class PageStats:
    """(mean, max, min) of every key page of each site, kept across calls (see the module's docstring)."""

    def __init__(self) -> None:
        self._sites: dict[Site, _SitePages] = {}
        self.pages_pooled = 0  # pages computed from their keys, over every call (what a step costs)

    def clear(self) -> None:
        self._sites.clear()

    def update(self, site: Site, k: Tensor, block_size: int, past: int) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, max, min) of each page of k (B, Hkv, K, D), each (B, Hkv, ceil(K / block_size), D),
        the pages before the first one touched since the site's last call reused. ``past``: keys
        that were in the cache before this call."""
        if torch.is_grad_enabled():  # (a decoding step runs without: no context to enter, a step's µs)
            with torch.no_grad():
                return self._update(site, k, block_size, past)
        return self._update(site, k, block_size, past)

    def _update(self, site: Site, k: Tensor, block_size: int, past: int) -> tuple[Tensor, Tensor, Tensor]:
        B, Hk, K, D = k.shape
        bs = block_size
        n_pages = math.ceil(K / bs)
        entry = self._sites.get(site)
        native = paged_cpu.supports(k) and paged_cpu.load() is not None
        start = 0  # the first page pooled from the keys
        if entry is not None and entry.fits(k, bs):
            start = min(entry.keys, past) // bs  # pages wholly among keys seen before
            # the same cache if the last of those pages still ends in the key it ended in (the C++
            # pooling looks itself)
            if start and not native and not torch.equal(k[:, :, start * bs - 1], entry.marks[:, :, start - 1]):
                start = 0
        else:
            capacity = max(n_pages, 1) * 2
            entry = _SitePages(bs, 0, k.new_empty(3, B, Hk, capacity, D), k.new_empty(B, Hk, capacity, D))
            self._sites[site] = entry
        entry.reserve(n_pages)
        if native:  # one C++ call (a step: one page)
            start = paged_cpu.pool_pages(k, entry.stats, entry.marks, bs, start)
        else:
            tail = k[:, :, start * bs:]
            length = tail.shape[2]
            if 0 < length <= bs:  # one page (a decoding step): pooled_keys' reductions, without its padding
                entry.stats[:, :, :, start] = torch.stack([tail.sum(2) / length, tail.amax(2), tail.amin(2)])
            elif length:
                geo = BlockGeometry(bs, length, length, causal=False, device=k.device)
                for i, t in enumerate(pooled_keys(tail, geo)):
                    entry.stats[i, :, :, start:n_pages] = t
            full_pages = K // bs
            if full_pages > start:
                entry.marks[:, :, start:full_pages] = k[:, :, start * bs + bs - 1: full_pages * bs: bs]
        self.pages_pooled += n_pages - start
        entry.keys = K
        if entry.views is None or entry.views[0] != n_pages:  # views into the buffers, made when the pages grow
            entry.views = (n_pages, tuple(entry.stats.narrow(3, 0, n_pages).unbind(0)))
        return entry.views[1]
