"""Observers: what to do with the logits and probabilities the seam computes."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.metrics.accumulate import HeadStatsAccumulator
from attnkit.seam.call import ObservedChunk
from attnkit.seam.session import Observer


class StatsCollector(Observer):
    """Per-(layer, head) statistics, streamed: nothing n x n is kept.

    ``layers[l]`` is a ``HeadStatsAccumulator`` over the observed heads of layer l (in the
    order of ``head_ids[l]``). ``call_order`` lists layers in the order their calls first ran
    in the last forward, which is where a non-finite value first appears.
    """

    accepts_key_prefix = True  # statistics are over visible keys: the rest may be left out

    def __init__(self) -> None:
        self.layers: dict[int, HeadStatsAccumulator] = {}
        self.head_ids: dict[int, list[int]] = {}
        self.num_heads: dict[int, int] = {}
        self.dtypes: dict[int, torch.dtype] = {}
        self.call_order: list[int] = []
        self.sampled = False
        self.rows_per_call: dict[int, int] = {}

    def start_forward(self) -> None:
        self.call_order = []

    def observe(self, chunk: ObservedChunk) -> None:
        layer = chunk.layer
        acc = self.layers.get(layer)
        if acc is None:
            acc = self.layers[layer] = HeadStatsAccumulator(len(chunk.head_ids), device=chunk.stats.probs.device)
            self.head_ids[layer] = list(chunk.head_ids)
            self.num_heads[layer] = chunk.call.num_heads
            self.dtypes[layer] = chunk.call.query.dtype
        if layer not in self.call_order:
            self.call_order.append(layer)
        if chunk.sampled:
            self.sampled = True
            acc.sampled_rows_of = chunk.call.query_length
        self.rows_per_call[layer] = chunk.call.query_length
        acc.update(chunk.stats)

    def heads(self) -> list[dict]:
        """One dict per observed (layer, head), layers and heads in model order."""
        out = []
        for layer in sorted(self.layers):
            for head, stats in zip(self.head_ids[layer], self.layers[layer].summary()):
                out.append({"layer": layer, "head": head, **stats})
        return out


class MapCapture(Observer):
    """Keeps the full attention probabilities: ``maps[layer]`` is (B, H_observed, Q, K) float32.

    With ``keep_logits`` also the pre-softmax logits, with ``keep_allowed`` the bool mask of
    keys each row could see. This is the n x n memory attnkit otherwise avoids; use it for a few
    layers or short inputs. A second forward replaces the maps of the first.
    """

    def __init__(self, keep_logits: bool = False, keep_allowed: bool = False) -> None:
        self.keep_logits = keep_logits
        self.keep_allowed = keep_allowed
        self.maps: dict[int, Tensor] = {}
        self.logits: dict[int, Tensor] = {}
        self.allowed: dict[int, Tensor] = {}
        self.head_ids: dict[int, list[int]] = {}

    def start_forward(self) -> None:
        self.maps, self.logits, self.allowed = {}, {}, {}

    def observe(self, chunk: ObservedChunk) -> None:
        s, layer = chunk.stats, chunk.layer
        B, h, _, K = s.probs.shape
        Q = chunk.call.query_length
        if layer not in self.maps or self.maps[layer].shape != (B, h, Q, K):
            self.maps[layer] = torch.full((B, h, Q, K), torch.nan)
            if self.keep_logits:
                self.logits[layer] = torch.full((B, h, Q, K), torch.nan)
            if self.keep_allowed:
                self.allowed[layer] = torch.zeros((B, h, Q, K), dtype=torch.bool)
            self.head_ids[layer] = list(chunk.head_ids)
        rows = chunk.rows.cpu()
        self.maps[layer][:, :, rows] = s.probs.detach().float().cpu()
        if self.keep_logits:
            self.logits[layer][:, :, rows] = s.logits.detach().float().cpu()
        if self.keep_allowed:
            self.allowed[layer][:, :, rows] = s.allowed.detach().cpu().expand(B, h, len(rows), K)
