"""The statistics tap: per-(site, head) statistics, streamed — nothing n x n is kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.metrics.accumulate import HeadStatsAccumulator, RowChunk
from attnkit.metrics.fused import RowStats
from attnkit.seam.call import AttentionCall
from attnkit.seam.sites import Site, SiteDict
from attnkit.seam.taps.base import ObservedChunk, Tap


@dataclass
class ObservedRows:
    """A chunk of query rows of one call reduced to per-row statistics (``metrics.fused``), for
    taps with an ``observe_rows`` method: what the observation pass hands them instead of an
    ``ObservedChunk`` when the logits are plain raw * scale and each row sees one key interval."""

    call: AttentionCall
    site: Site
    head_ids: list[int]
    rows: Tensor  # (R,) query row indices in the call
    sampled: bool
    positions: Tensor  # (R,) each row's position among the keys
    row_valid: Tensor  # (B, R) False for padding queries
    query_norm: Tensor  # (B, h, R)
    key_norm_max: Tensor  # (B, h)
    stats: RowStats  # every field (B, h, R)


class StatsCollector(Tap):
    """``layers[site]`` is a ``HeadStatsAccumulator`` over the observed heads of that site (in
    the order of ``head_ids[site]``). Sums run over every observed forward until ``reset``.
    ``call_order`` lists sites in the order their calls first ran in the last forward, which is
    where a non-finite value first appears. Its state is bounded by the number of sites.
    """

    accepts_key_prefix = True  # statistics are over visible keys: the rest may be left out

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.layers: dict[Site, HeadStatsAccumulator] = SiteDict()
        self.head_ids: dict[Site, list[int]] = SiteDict()
        self.num_heads: dict[Site, int] = SiteDict()
        self.dtypes: dict[Site, torch.dtype] = SiteDict()
        self.call_order: list[Site] = []
        self.sampled = False
        self.rows_per_call: dict[Site, int] = SiteDict()

    def start_forward(self) -> None:
        self.call_order = []
        for acc in self.layers.values():
            acc.close_sequences()  # the last forward's batch rows were its sequences

    def _accumulator(self, chunk: ObservedChunk | ObservedRows) -> HeadStatsAccumulator:
        site = chunk.site
        acc = self.layers.get(site)
        if acc is None:
            acc = self.layers[site] = HeadStatsAccumulator(len(chunk.head_ids), device=chunk.call.query.device)
            self.head_ids[site] = list(chunk.head_ids)
            self.num_heads[site] = chunk.call.num_heads
            self.dtypes[site] = chunk.call.query.dtype
        if site not in self.call_order:
            self.call_order.append(site)
        if chunk.sampled:
            self.sampled = True
            acc.sampled_rows_of = chunk.call.query_length
        self.rows_per_call[site] = chunk.call.query_length
        return acc

    def observe_rows(self, rows: ObservedRows) -> None:
        """The fast path: statistics computed in one fused pass over the raw scores.

        The fold is ~40 operations on (B, h, R) tensors, each too small to pay for a parallel
        region: on one thread it takes a tenth of the time it takes on several when the machine
        is loaded (threads meet at each region's barrier; a descheduled one holds the rest)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._accumulator(rows).update_rows(rows.stats, rows.row_valid, rows.query_norm, rows.key_norm_max,
                                                rows.call.scale)
        finally:
            torch.set_num_threads(threads)

    def observe(self, chunk: ObservedChunk) -> None:
        """Chunks with modified logits, learned sinks or masks that are not key intervals."""
        acc = self._accumulator(chunk)
        acc.update(RowChunk(
            logits=chunk.logits,
            probs=chunk.probs,
            allowed=chunk.allowed,
            query_positions=chunk.positions,
            row_valid=chunk.row_valid,
            query_norm=chunk.query_norm,
            key_norm_max=chunk.key_norm_max,
            scale=chunk.call.scale,
            qk_absmax=chunk.qk_absmax,
            logit_max=chunk.logit_max,
            logit_min=chunk.logit_min,
            rows_sum_below_one=chunk.sinks is not None,
        ))

    def all_reduce(self, group=None) -> None:
        """Sum (and max/min) every accumulator over the processes of ``group`` (torch.distributed),
        so that each rank holds the statistics of the whole global batch. Every rank must call it.

        A rank that observed fewer sites (or none: its share of a dataset was empty) first takes
        the others' sites with empty accumulators, which add nothing."""
        from attnkit.metrics.distributed import all_reduce_accumulator

        self._adopt_sites_of_every_rank(group)
        for site in sorted(self.layers):
            all_reduce_accumulator(self.layers[site], group)

    def _adopt_sites_of_every_rank(self, group=None) -> None:
        import torch.distributed as dist

        mine = {site: (self.head_ids[site], self.num_heads[site], self.dtypes[site], self.rows_per_call.get(site),
                       acc.sampled_rows_of, acc.rows.device.type)
                for site, acc in self.layers.items()}
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, (mine, list(self.call_order), self.sampled), group=group)
        for sites, call_order, sampled in everyone:
            self.sampled = self.sampled or sampled
            if not self.call_order:
                self.call_order = list(call_order)
            for site, (head_ids, num_heads, dtype, rows_per_call, sampled_rows_of, device_type) in sites.items():
                if site in self.layers:
                    continue
                # on the device type the other ranks reduce on (one backend per device type)
                device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)
                acc = self.layers[site] = HeadStatsAccumulator(len(head_ids), device=device)
                acc.sampled_rows_of = sampled_rows_of
                self.head_ids[site], self.num_heads[site], self.dtypes[site] = list(head_ids), num_heads, dtype
                if rows_per_call is not None:
                    self.rows_per_call[site] = rows_per_call

    def heads(self) -> list[dict]:
        """One dict per observed (site, head), sites and heads in model order."""
        out = []
        for site in sorted(self.layers):
            for head, stats in zip(self.head_ids[site], self.layers[site].summary()):
                out.append({"layer": site.layer, "stack": site.stack, "kind": site.kind, "head": head, **stats})
        return out
