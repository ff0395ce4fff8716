"""Per-layer gradient norm of the attention's query/key parameters, read as autograd writes it.

The parameters come from the layout module (``attnkit.seam.layouts``): for GPT-2's
fused ``c_attn`` only its query and key columns count. A post-accumulate-grad hook on each of them
reads the gradient the moment backward has finished writing it — on observed steps only — so it
works whatever the loop does afterwards (``zero_grad(set_to_none=True)`` before ``on_step`` included)
and never changes a gradient. With gradient accumulation it keeps the last (accumulated) value.

Under ``torch.distributed`` those hooks see each rank's *local* gradient (DDP averages the ranks'
gradients after them), so the monitor, when it has the optimizer, reads the gradients instead in
an optimizer step pre-hook (``read_now``): the averaged gradient the optimizer applies, the same
on every rank and equal to one process's gradient on the whole batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.errors import UserError
from attnkit.seam.layouts import Piece, qk_layout
from attnkit.seam.sites import Site


class GradNorms:
    def __init__(self) -> None:
        # the monitor's session once it exists: its ``active`` says whether this step is observed.
        # Held here rather than through a closure over the monitor, which would tie the monitor
        # (and the model it holds, a DDP wrapper say) into a cycle that outlives ``close``.
        self.session = None
        self.sites: dict[Site, list[nn.Parameter]] = {}
        self._pieces: dict[int, list[tuple[Site, list[Piece]]]] = {}
        self._sq: dict[tuple[Site, int], torch.Tensor] = {}
        self._handles: list = []
        self.unknown: list[str] = []  # module types whose layout is unknown (no grad norm for them)
        self.on_accumulate = True  # False: read only by read_now (the optimizer pre-hook, under DDP)

    def add(self, site: Site, module: nn.Module) -> None:
        if site in self.sites:
            return
        try:
            layout = qk_layout(module)
        except UserError:
            self.sites[site] = []
            self.unknown.append(type(module).__name__)
            return
        self.sites[site] = layout.params()
        for p in layout.params():
            if not p.requires_grad:
                continue
            first = id(p) not in self._pieces
            self._pieces.setdefault(id(p), []).append((site, layout.pieces_of(p)))
            if first:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _armed(self) -> bool:
        return self.session is not None and self.session.active

    def _hook(self, p: torch.Tensor) -> None:
        if not self.on_accumulate or not self._armed() or p.grad is None:
            return
        self._read(p)

    def _read(self, p: torch.Tensor) -> None:
        with torch.no_grad():
            for site, pieces in self._pieces.get(id(p), ()):
                self._sq[(site, id(p))] = sum(piece.of(p.grad).float().square().sum() for piece in pieces)

    def read_now(self) -> None:
        """Read every tracked parameter's current ``.grad`` (on observed steps only)."""
        if not self._armed():
            return
        for params in self.sites.values():
            for p in params:
                if p.grad is not None:
                    self._read(p)

    def collect(self, sites: list[Site]) -> list[float] | None:
        """Per site, sqrt of the sum of squares gathered since the last collect (NaN where none)."""
        if not self._sq:
            return None
        keys = list(self._sq)
        values = torch.stack([self._sq[k] for k in keys]).tolist()
        per_site: dict[Site, float] = {}
        for (site, _), v in zip(keys, values):
            per_site[site] = per_site.get(site, 0.0) + v
        self._sq.clear()
        return [math.sqrt(per_site[s]) if s in per_site else math.nan for s in sites]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
