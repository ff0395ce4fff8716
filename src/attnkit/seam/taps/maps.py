"""The map tap: keeps full attention probabilities (and optionally logits and masks)."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.seam.sites import Site, SiteDict
from attnkit.seam.taps.base import ObservedChunk, Tap


class MapCapture(Tap):
    """``maps[site]`` is (B, H_observed, Q, K) float32 on the CPU.

    With ``keep_logits`` also the pre-softmax logits, with ``keep_allowed`` the bool mask of
    keys each row could see. This is the n x n memory attnkit otherwise avoids; use it for a few
    layers or short inputs. Each forward replaces the maps of the one before.
    """

    def __init__(self, keep_logits: bool = False, keep_allowed: bool = False) -> None:
        self.keep_logits = keep_logits
        self.keep_allowed = keep_allowed
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
        self.maps[site][:, :, rows] = probs.float().cpu()
        if self.keep_logits:
            self.logits[site][:, :, rows] = chunk.logits.float().cpu()
        if self.keep_allowed:
            self.allowed[site][:, :, rows] = chunk.allowed.cpu().expand(B, h, len(rows), K)
