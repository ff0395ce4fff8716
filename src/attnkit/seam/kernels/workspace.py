"""One allocation that a block-sparse call's small temporaries are carved from.

A block-sparse call makes many small temporaries besides its attention: the pattern's pooled
means and block scores, the selection's copy of the scores and their sort order, the split
kernel's plan (the kept blocks sorted per row, in row order). Made one by one, each comes from the
allocator's heap (they are small), and the heap pages they touch stay resident after they are
freed, below whatever the call keeps: a training step's resident set grows by them. Carved from
one ``Workspace`` instead (``out=`` and in-place ops into its views), they are one allocation,
handed back whole when the call releases the workspace, and no temporary shares memory with
another or with a later call. Handed back whole means unmapped where the allocation is above
glibc's mmap threshold (128 KiB by default; the threshold rises after larger blocks are freed, so
in a long-running process a workspace may come from the heap like the temporaries it replaces).

A workspace is made for one call with the capacity the site's previous call needed (``used``); what
does not fit is a fresh tensor. ``release`` drops the arena once the call's temporaries are done (after
the selection, or after the split kernel's plan), so the attention itself runs without it; a later
``take`` would make a new arena for the room that is left. Only temporaries go in: what a call
returns, records or keeps for its backward is never a view of a workspace.

    ws = Workspace(capacity)
    order = ws.take((B, Hkv, nQb, nKb), torch.long, scores.device)   # a view of the arena
    ...
    ws.release()                                                     # the temporaries are done
    capacity = ws.used                                               # for the site's next call
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_ALIGN = 64  # bytes: every view starts on a cache line


class Workspace:
    """A bump allocator over one byte tensor, made on the first ``take`` for the room that is left of
    ``capacity`` bytes (all of it at first; what remains after a ``release``)."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.used = 0  # bytes asked for so far, in the arena or not: the capacity a next call needs
        self._arena: Tensor | None = None
        self._base = 0  # the offset of the arena's first byte in the call's sequence of takes

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` on ``device`` that shares memory with no
        other ``take``: a view of the arena while it has room, else a fresh tensor."""
        nbytes = math.prod(shape) * dtype.itemsize
        start, self.used = self.used, self.used + -(-nbytes // _ALIGN) * _ALIGN
        if self._arena is None and self.capacity > start:
            self._arena = torch.empty(self.capacity - start, dtype=torch.uint8, device=device)
            self._base = start
        arena = self._arena
        if arena is None or self.used - self._base > arena.numel() or arena.device != torch.device(device):
            return torch.empty(shape, dtype=dtype, device=device)
        offset = start - self._base
        return arena[offset: offset + nbytes].view(dtype).view(shape)

    def release(self) -> None:
        """Hand the arena back (views still held keep their memory until they go); the next ``take``
        makes a new one for the room that is left."""
        self._arena = None


def take_or_new(workspace: Workspace | None, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """``workspace.take(...)``, or a fresh tensor without a workspace."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.take(shape, dtype, device)
