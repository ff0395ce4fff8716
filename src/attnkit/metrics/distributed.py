"""Streamed statistics across processes: one ``all_reduce`` per accumulator field.

Sums and counts add up, extremes take the max (or min), so the reduced accumulator equals the
one a single process would have built from every rank's rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit.metrics.accumulate import COUNTS, HeadStatsAccumulator

_SUMMED = COUNTS
_MAXED = ("logit_max", "qk_absmax", "log10_curvature_max")
_MINNED = ("logit_min",)


def all_reduce_accumulator(acc: HeadStatsAccumulator, group=None) -> None:
    for key in sorted(acc.sums):
        dist.all_reduce(acc.sums[key], op=dist.ReduceOp.SUM, group=group)
    for name in _SUMMED:
        dist.all_reduce(getattr(acc, name), op=dist.ReduceOp.SUM, group=group)
    for name in _MAXED:
        dist.all_reduce(getattr(acc, name), op=dist.ReduceOp.MAX, group=group)
    for name in _MINNED:
        dist.all_reduce(getattr(acc, name), op=dist.ReduceOp.MIN, group=group)
    # The per-sequence sums behind the interval over sequences are gathered, not summed: every
    # rank's sequences are units of their own (a few floats per sequence and head).
    entropy, rows = acc.sequence_sums()
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (entropy, rows), group=group)
    acc.set_sequence_sums(torch.cat([e for e, _ in gathered]), torch.cat([r for _, r in gathered]))
