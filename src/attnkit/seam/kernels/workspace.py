"""One allocation that a block-sparse call's small temporaries are carved from.

A block-sparse call makes many small temporaries besides its attention: the pattern's pooled
means and block scores, the selection's copy of the scores and their sort order, the split
kernel's plan (the kept blocks sorted per row, in row order). Made one by one, each comes from the
allocator's heap (they are small), and the heap pages they touch stay resident after they are
freed, below whatever the call keeps: a training step's resident set grows by them. Carved from
one ``Workspace`` instead (``out=`` and in-place ops into its views), they are one allocation,
handed back whole when the call drops the workspace (an allocation this large is its own mapping
for the allocator), and no temporary shares memory with another or with a later call.

A workspace is made for one call with the capacity the calls before it needed (``used``); what does
not fit is a fresh tensor. Only temporaries go in: what a call returns, records or keeps for its
backward is never a view of a workspace.

    ws = Workspace(capacity)
    order = ws.take((B, Hkv, nQb, nKb), torch.long, scores.device)   # a view of the arena
    ...
    capacity = max(capacity, ws.used)                                # for the next call
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_ALIGN = 64  # bytes: every view starts on a cache line


class Workspace:
    """A bump allocator over one byte tensor of ``capacity`` bytes (made on the first ``take``)."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.used = 0  # bytes asked for so far, in the arena or not: the capacity a next call needs
        self._arena: Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` on ``device`` that shares memory with no
        other ``take``: a view of the arena while it has room, else a fresh tensor."""
        nbytes = math.prod(shape) * dtype.itemsize
        start, self.used = self.used, self.used + -(-nbytes // _ALIGN) * _ALIGN
        if self._arena is None and self.capacity:
            self._arena = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        arena = self._arena
        if arena is None or self.used > arena.numel() or arena.device != torch.device(device):
            return torch.empty(shape, dtype=dtype, device=device)
        return arena[start: start + nbytes].view(dtype).view(shape)


def take_or_new(workspace: Workspace | None, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """``workspace.take(...)``, or a fresh tensor without a workspace."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.take(shape, dtype, device)
