"""The statistics tap: per-(site, head) statistics, streamed — nothing n x n is kept."""

from __future__ import annotations

import torch

from attnkit.metrics.accumulate import HeadStatsAccumulator, RowChunk
from attnkit.seam.sites import Site, SiteDict
from attnkit.taps import ObservedChunk, Tap


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

    def observe(self, chunk: ObservedChunk) -> None:
        site = chunk.site
        acc = self.layers.get(site)
        if acc is None:
            acc = self.layers[site] = HeadStatsAccumulator(len(chunk.head_ids), device=chunk.logits.device)
            self.head_ids[site] = list(chunk.head_ids)
            self.num_heads[site] = chunk.call.num_heads
            self.dtypes[site] = chunk.call.query.dtype
        if site not in self.call_order:
            self.call_order.append(site)
        if chunk.sampled:
            self.sampled = True
            acc.sampled_rows_of = chunk.call.query_length
        self.rows_per_call[site] = chunk.call.query_length
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
        ))

    def all_reduce(self, group=None) -> None:
        """Sum (and max/min) every accumulator over the processes of ``group`` (torch.distributed),
        so that each rank holds the statistics of the whole global batch. Every rank must have
        observed the same sites."""
        from attnkit.metrics.distributed import all_reduce_accumulator

        for site in sorted(self.layers):
            all_reduce_accumulator(self.layers[site], group)

    def heads(self) -> list[dict]:
        """One dict per observed (site, head), sites and heads in model order."""
        out = []
        for site in sorted(self.layers):
            for head, stats in zip(self.head_ids[site], self.layers[site].summary()):
                out.append({"layer": site.layer, "stack": site.stack, "kind": site.kind, "head": head, **stats})
        return out
