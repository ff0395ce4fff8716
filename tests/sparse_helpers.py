"""Random block selections and q/k/v for the block-sparse kernel tests."""

from __future__ import annotations

import torch

from attnkit.sparse import BlockGeometry, SparseConfig, select_blocks, sparse_attention


def random_selection(B, Hk, T, bs, density, seed=0, causal=True, Q=None, sinks=True):
    """A random selection (random scores) over a (Q of T) call, and its geometry."""
    Q = T if Q is None else Q
    geo = BlockGeometry(bs, Q, T, causal=causal)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, Hk, geo.n_query_blocks, geo.n_key_blocks, generator=g)
    return select_blocks(scores, geo, geo.forced(1, 1, sinks=sinks), density), geo


def random_qkv(B, H, Hk, Q, T, D, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hk, T, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hk, T, D, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def written_part_of_buffers(g: torch.Generator, B, H, Hk, K, D, room):
    """A decoding step's query (B, H, 1, D) and its keys and values (B, Hkv, K, D) as a preallocated
    cache (StaticCache) hands them over: the first K slots of buffers ``room`` slots longer, views
    whose heads lie K + room slots apart. Float64, drawn from ``g``."""
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    buffers = torch.randn(2, B, Hk, K + room, D, generator=g, dtype=torch.float64)
    return q, buffers[0, :, :, :K], buffers[1, :, :, :K]


def runs_by_kernel(model, batches, kernels=("auto", "portable"), **cfg):
    """{kernel: (logits of each batch, every parameter's gradient, {kernel that ran: calls})}: the
    batches' forwards under ``sparse_attention(model, SparseConfig(kernel=kernel, **cfg))``, then one
    backward of their summed losses."""
    results = {}
    for kernel in kernels:
        model.zero_grad(set_to_none=True)
        with sparse_attention(model, SparseConfig(kernel=kernel, **cfg)) as handle:
            outs = [model(input_ids=ids, labels=ids) for ids in batches]
            sum(out.loss for out in outs).backward()
        results[kernel] = ([out.logits.detach() for out in outs], [p.grad.clone() for p in model.parameters()],
                           dict(handle.kernels))
    return results
