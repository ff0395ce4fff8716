"""A decoding step's page selection and attention in C++ (``paged_decode.cpp``), on the CPU.

The eager step (``paged_decode.py``) is some forty small tensor ops a layer: the pages' bounds
as two matrix products, a sort, the kept pages copied out of the cache, SDPA on the copy. On a
CPU each op costs microseconds of dispatch before any work, so at batch 1 the ops, not the
arithmetic, set the step's time. Here it is three calls (the first where the cache grew):

    pool_pages(k, stats, marks, block_size, start)             # the pages' (mean, max, min) from page start on

    pages = step_pages(q, k_max, k_min, budget, local, first)   # (B, Hkv, budget) int64, forced first;
                                                                # allowed=, block_size= a padding mask
    out = paged_attention(q, k, v, pages, block_size, scale)    # (B, H, 1, Dv); allowed= a padding mask

``step_pages`` scores every free page by Quest's bound (Σ_d max(q_d·kmax_d, q_d·kmin_d), summed over a
KV group's query heads, in double; MoBA passes each page's mean as both max and min) and keeps the
forced pages, then the best up to the budget, ties to the later page, a page a padding mask hides
whole below every other (NaN bounds too): ``select_step_pages``' order. ``paged_attention`` reads
only the kept pages' keys and values (of them, with a padding mask, the keys the row may see; a row
that sees none is zero), in place in the cache (any strides), with an online softmax over them
(on torch's intra-op threads, a (batch row, KV head) each, when the kept keys are many).
float32, bfloat16, float16 (accumulated in float32) and float64 (in double); no autograd (a
decoding step under ``no_grad``).

Built once per machine (``attnkit.metrics.native``); ``load()`` is None where it cannot be built,
and the block-sparse kernels then run the eager step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from attnkit.metrics.native import VEC_MATH, NativeKernel

KERNEL = NativeKernel("paged_decode", Path(__file__).with_name("paged_decode.cpp"), "attnkit_paged",
                      "paged decoding kernel", headers=(VEC_MATH,), build_seconds=20)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def load():
    """``torch.ops.attnkit_paged``, building it on first use; None (after one warning) where it cannot be."""
    return KERNEL.load()


def supports(*tensors: Tensor) -> bool:
    """Whether the kernel takes these tensors: on the CPU, one dtype of ``DTYPES``, no gradient asked for.
    (Called a few times a step: plain loops, no generator.)"""
    dtype = tensors[0].dtype
    if dtype not in DTYPES:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if not t.is_cpu or t.dtype != dtype or (grad and t.requires_grad):
            return False
    return True


def step_pages(q: Tensor, k_max: Tensor, k_min: Tensor, budget: int, local: int, first: int,
               allowed: Tensor | None = None, block_size: int = 0) -> Tensor:
    """(B, Hkv, budget) int64 pages a decoding step keeps: the last ``local`` and the first ``first``
    (forced), then the best by Quest's bound. q: (B, H, 1, D); k_max, k_min: (B, Hkv, P, D).
    allowed: the model's padding mask, bool (B|1, 1, 1, K) over the K keys of the P pages of
    ``block_size``, or None: a page it hides whole is kept only after every page it does not."""
    seen = None if allowed is None else allowed[:, 0, 0].expand(q.shape[0], allowed.shape[-1])
    return load().quest_step_pages(q.squeeze(2), k_max, k_min, budget, local, first, seen, block_size)


def pool_pages(k: Tensor, stats: Tensor, marks: Tensor, block_size: int, start: int) -> int:
    """Pages ``start`` on of k (B, Hkv, K, D), in place: their (mean, max, min) into stats (3, B, Hkv,
    capacity, D) (the mean summed in double), the last key of each full page into marks (B, Hkv,
    capacity, D); every page instead when the key that ends page ``start - 1`` is not its mark
    (another cache: a new prompt, reordered rows). Returns the first page pooled. A NaN key makes
    its page's max and min NaN, as ``amax`` / ``amin``."""
    return load().pool_pages(k, stats, marks, block_size, start)


def paged_attention(q: Tensor, k: Tensor, v: Tensor, pages: Tensor, block_size: int, scale: float,
                    allowed: Tensor | None = None) -> Tensor:
    """(B, H, 1, Dv) attention of one query per head over the keys of ``pages`` (B, Hkv, S) only.
    q: (B, H, 1, D); k, v: (B, Hkv, K, D|Dv), a page = ``block_size`` keys (the last may be partial).
    allowed: the model's padding mask, bool (B|1, 1, 1, K' >= K), True = may attend, or None: a key it
    hides is left out (a row that sees no key is zero)."""
    B, H = q.shape[:2]
    K = k.shape[2]
    seen = None if allowed is None else allowed[:, 0, 0, :K].expand(B, K)
    out = load().paged_attention(q.squeeze(2), k, v, pages.reshape(B, k.shape[1], -1), block_size, float(scale), seen)
    return out.view(B, H, 1, -1)


__all__ = ["DTYPES", "KERNEL", "load", "paged_attention", "pool_pages", "step_pages", "supports"]
