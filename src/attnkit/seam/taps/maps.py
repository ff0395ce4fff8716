"""The map tap: keeps full attention probabilities (and optionally logits and masks)."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.errors import UserError
from attnkit.seam.sites import Site, SiteDict
from attnkit.seam.taps.base import ObservedChunk, Tap


def _sink_shares(probs: Tensor) -> Tensor:
    return probs  # the softmax over the keys and the sink, the sink's column left out: rows sum below one


def _sink_excluded(probs: Tensor) -> Tensor:
    # The softmax over the keys alone: the same map divided by what the keys hold of the row.
    mass = probs.sum(-1, keepdim=True)
    return torch.where(mass > 0, probs / mass.clamp_min(torch.finfo(probs.dtype).tiny), 0.0)


# How a map shows a learned attention sink (a logit per head, or per head and row, that joins each
# row's softmax denominator and attends to nothing). Models differ in what their own
# ``output_attentions`` returns: gpt-oss, Inkling2 and MiMo-V2 the "share" map, Granite SWA the
# "excluded" one (it rescales its output by the keys' share instead). Calls without a sink are the
# same under both.
SINK_CONVENTIONS = {
    "share": _sink_shares,
    "excluded": _sink_excluded,
}


class MapCapture(Tap):
    """``maps[site]`` is (B, H_observed, Q, K) float32 on the CPU.

    With ``keep_logits`` also the pre-softmax logits, with ``keep_allowed`` the bool mask of
    keys each row could see. This is the n x n memory attnkit otherwise avoids; use it for a few
    layers or short inputs. Each forward replaces the maps of the one before.

    ``sink``: where a call has learned sink logits, "share" (the default) gives the weights the
    model applies to the values: the softmax over the keys and the sink, whose share is not a
    column, so a row sums to one minus the sink's share. "excluded" gives the softmax over the
    keys alone (rows sum to one), the convention of models whose own ``output_attentions`` leaves
    the sink out (Granite SWA). See ``SINK_CONVENTIONS``.
    """

    def __init__(self, keep_logits: bool = False, keep_allowed: bool = False, sink: str = "share") -> None:
        if sink not in SINK_CONVENTIONS:
            raise UserError(f"unknown sink convention {sink!r}; known: {', '.join(SINK_CONVENTIONS)}")
        self.keep_logits = keep_logits
        self.keep_allowed = keep_allowed
        self.sink = sink
        self.maps: dict[Site, Tensor] = SiteDict()
        self.logits: dict[Site, Tensor] = SiteDict()
        self.allowed: dict[Site, Tensor] = SiteDict()
        self.head_ids: dict[Site, list[int]] = SiteDict()

    def start_forward(self) -> None:
        self.maps, self.logits, self.allowed = SiteDict(), SiteDict(), SiteDict()

    def observe(self, chunk: ObservedChunk) -> None:
        site = chunk.site
        probs = chunk.probs
        B, h, _, K = probs.shape
        Q = chunk.call.query_length
        if site not in self.maps or self.maps[site].shape != (B, h, Q, K):
            self.maps[site] = torch.full((B, h, Q, K), torch.nan)
            if self.keep_logits:
                self.logits[site] = torch.full((B, h, Q, K), torch.nan)
            if self.keep_allowed:
                self.allowed[site] = torch.zeros((B, h, Q, K), dtype=torch.bool)
            self.head_ids[site] = list(chunk.head_ids)
        rows = chunk.rows.cpu()
        if chunk.call.sinks is not None:
            probs = SINK_CONVENTIONS[self.sink](probs.float())
        self.maps[site][:, :, rows] = probs.float().cpu()
        if self.keep_logits:
            self.logits[site][:, :, rows] = chunk.logits.float().cpu()
        if self.keep_allowed:
            self.allowed[site][:, :, rows] = chunk.allowed.cpu().expand(B, h, len(rows), K)
