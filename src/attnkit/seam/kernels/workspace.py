"""Scratch tensors a block-sparse call writes its temporaries into, kept from call to call.

A block-sparse call makes many small temporaries besides its attention: the selection's copy of
the block scores and its sort order, the split kernel's plan (the kept blocks sorted per row, in
row order). Made fresh on every call, each comes from the allocator's heap (they are small), and
the heap pages they touch stay resident after they are freed: a training step's resident set
grows by them. Written into a ``Workspace`` instead (``out=`` and in-place ops), they take no
memory after the first call of a shape: a named buffer per kind of temporary, grown to the
largest shape asked for, handed out as a view of its first elements.

Only temporaries go in: what a call returns, records or keeps for its backward is never a view of
a workspace (the next call overwrites it). One workspace serves the calls of one model one after
another (``sparse_attention`` keeps one per model): not two calls at once.

    ws = Workspace()
    order = ws.take("order", (B, Hkv, nQb, nKb), torch.long, scores.device)  # a view, overwritten next call
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Workspace:
    """Named scratch buffers, one per (name, dtype, device), each grown to the largest size asked for."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A tensor of ``shape`` and ``dtype`` on ``device`` with unspecified contents: ``name``'s
        buffer (made or grown here), valid until the next ``take`` of that name. Two temporaries
        alive at once need two names."""
        n = math.prod(shape)
        key = (name, dtype, torch.device(device))
        flat = self._buffers.get(key)
        # a buffer made under inference mode cannot be written outside it: made again
        if flat is None or flat.numel() < n or (flat.is_inference() and not torch.is_inference_mode_enabled()):
            flat = self._buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return flat[:n].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (the next ``take`` of each makes it again)."""
        self._buffers.clear()


def take_or_new(workspace: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """``workspace.take(...)``, or a fresh tensor without a workspace."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.take(name, shape, dtype, device)
