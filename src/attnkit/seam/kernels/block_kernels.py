"""Block-sparse kernels: what computes a call's output once its kept key blocks are chosen.

Each is a registry entry with ``supports(call, explicit)`` and ``run(call)``; ``choose_block_kernel``
takes the one asked for, or in ``auto`` the first that supports the call, in this order:

- ``paged_cpu``: a decoding step on the CPU without a gradient, the gate's term, a bias, soft-cap,
  sinks, dropout or other modifiers, the model's mask (if any) a bool padding mask over every key:
  the kept pages' keys and values read in place from the cache by one C++ call (``paged_cpu.py``),
  where that kernel builds.
- ``paged_decode``: a decoding step (one query per head; the model's mask, if any, one row per batch
  row over every key; no bias, soft-cap, sinks, dropout or other modifiers): only the kept pages' keys
  and values are read from the cache (``paged_decode.py``); any device, with autograd.
- ``flex``: compiled FlexAttention with a ``BlockMask`` from the selection (in ``auto`` on CUDA
  only; asked for, also CPU inference: PyTorch has no CPU backward for it).
- ``split_sdpa``: causal calls of several query blocks: each query block against its own key block
  in one causal SDPA call that reads the keys in place, the other kept blocks gathered into
  unmasked SDPA calls (query blocks bucketed by how many they keep), merged by their log-sum-exp;
  selections whose rows of a query block keep the same number of blocks (every pattern's).
- ``gather_sdpa``: SDPA's fused CPU kernel on the gathered kept blocks, rows bucketed by how many
  blocks they keep, the own block masked; bidirectional calls and a decoding step's lone query
  block. Both SDPA kernels: cost that falls with density (forward and backward); calls without
  the model's own mask, bias, soft-cap, sinks, dropout or other modifiers, on the CPU (a prompt
  into a preallocated cache comes without its mask: ``sparse_attention`` cuts the call to the
  written keys when the mask is exactly causal over them).
- ``portable``: attnkit's gather kernel, any call, any device, with a backward (the reference
  the others are tested against).

    kernel = choose_block_kernel(call)          # BlockCall: q, k, v, the selection and the extras
    out = kernel.run(call)                      # (B, H, Q, Dv)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.seam.kernels import paged_cpu
from attnkit.seam.kernels.block_attention import block_sparse_attention
from attnkit.seam.kernels.blocks import BlockSelection
from attnkit.seam.kernels.flex_block import flex_available, flex_block_attention
from attnkit.seam.kernels.gather_sdpa import gather_sdpa_attention, sdpa_fused_cpu_available
from attnkit.seam.kernels.paged_decode import paged_decode_attention, paged_decode_supported
from attnkit.seam.kernels.split_sdpa import kept_per_query_block, split_sdpa_attention
from attnkit.seam.kernels.workspace import Workspace


@dataclass(frozen=True)
class BlockCall:
    """One attention call to run over its kept blocks.

    query: (B, H, Q, D); key / value: (B, Hkv, K, D|Dv), the model's own KV heads.
    block_bias: (B, Hkv, nQb, S) the gate's term on each kept slot's scores, or None;
    full_bias: the same per key block, (B, Hkv, nQb, nKb) (what FlexAttention's score_mod reads).
    allowed / bias / softcap / sinks / dropout_p: the call's own; mods: other sessions' modifiers.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    selection: BlockSelection
    scale: float
    block_bias: Tensor | None = None
    full_bias: Tensor | None = None
    allowed: Tensor | None = None
    bias: Tensor | None = None
    softcap: float | None = None
    sinks: Tensor | None = None
    dropout_p: float = 0.0
    mods: object | None = None  # attnkit.seam.plan.Mods, or None
    chunk_elements: int = 1 << 21
    checkpoint: bool = True
    workspace: Workspace | None = None  # where a kernel may write its temporaries (``workspace.py``)

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.query, self.key, self.value, self.block_bias, self.bias))

    @property
    def plain(self) -> bool:
        """No model mask, bias, soft-cap, sinks, dropout or other modifiers: the kept blocks' softmax only."""
        return (self.allowed is None and self.bias is None and self.softcap is None and self.sinks is None
                and not self.dropout_p and not self.mods)


@dataclass(frozen=True)
class BlockKernel:
    name: str
    supports: Callable[[BlockCall, bool], bool]  # (call, chosen explicitly)
    run: Callable[[BlockCall], Tensor]  # -> (B, H, Q, Dv)
    cannot: str  # what it cannot run, for the error when it is asked for and cannot
    # carves temporaries of its own from the call's workspace (and releases it before its attention);
    # the caller releases the workspace before running a kernel that does not
    takes_workspace: bool = False


def _paged_cpu_supports(call: BlockCall, explicit: bool) -> bool:
    sel = call.selection
    padding_only = call.allowed is None or call.allowed.dtype == torch.bool  # (its shape: paged_decode_supported)
    return (padding_only and call.bias is None and call.softcap is None and call.sinks is None and not call.dropout_p
            and not call.mods and call.block_bias is None
            and paged_decode_supported(call.query, sel.geometry, call.allowed) and sel.all_valid
            and paged_cpu.supports(call.query, call.key, call.value) and paged_cpu.load() is not None)


def _paged_cpu_run(c: BlockCall) -> Tensor:
    sel = c.selection
    return paged_cpu.paged_attention(c.query, c.key, c.value, sel.indices, sel.geometry.block_size, c.scale,
                                     allowed=c.allowed)


def _paged_decode_supports(call: BlockCall, explicit: bool) -> bool:
    return (call.bias is None and call.softcap is None and call.sinks is None and not call.dropout_p and not call.mods
            and paged_decode_supported(call.query, call.selection.geometry, call.allowed))


def _paged_decode_run(c: BlockCall) -> Tensor:
    sel = c.selection
    return paged_decode_attention(c.query, c.key, c.value, sel.indices, sel.valid, sel.geometry, scale=c.scale,
                                  block_bias=c.block_bias, allowed=c.allowed)


def _flex_supports(call: BlockCall, explicit: bool) -> bool:
    expressible = (flex_available() and call.selection.geometry.front == 0 and call.sinks is None
                   and not call.dropout_p and not call.mods)
    on_cuda = call.query.device.type == "cuda"
    if explicit:
        return expressible and (on_cuda or not call.needs_grad)
    # auto: on CUDA, except where a gradient must reach the gate through its score modifier
    # (captured-tensor gradients: left to the portable kernel, which is tested)
    gate_grad = call.block_bias is not None and call.block_bias.requires_grad and torch.is_grad_enabled()
    return expressible and on_cuda and not gate_grad


def _flex_run(c: BlockCall) -> Tensor:
    return flex_block_attention(c.query, c.key, c.value, c.selection, scale=c.scale, block_log_probs=c.full_bias,
                                allowed=c.allowed, bias=c.bias, softcap=c.softcap)


def _sdpa_expressible(call: BlockCall) -> bool:
    """A plain call on the CPU whose gate term (if any) needs no gradient: what SDPA's fused kernel runs."""
    if not (call.query.device.type == "cpu" and call.plain and sdpa_fused_cpu_available()):
        return False
    # the gate's gradient through the scores: the portable kernel's
    return not (call.block_bias is not None and call.block_bias.requires_grad and torch.is_grad_enabled())


def _keeps_own_blocks(sel: BlockSelection) -> bool:
    """Whether every row keeps at least one block and, when causal, its own (diagonal) block."""
    geo = sel.geometry
    B, Hk, nQ, S = sel.indices.shape
    valid = sel.valid.expand(B, Hk, nQ, S)
    if not geo.causal:
        return bool(valid.any(-1).all())
    own = geo.query_block_ids.to(sel.indices.device)[:, None]  # (nQb, 1)
    return bool(((sel.indices == own) & valid).any(-1).all())


def _split_sdpa_supports(call: BlockCall, explicit: bool) -> bool:
    geo = call.selection.geometry
    return (geo.causal and geo.n_query_blocks > 1 and _sdpa_expressible(call) and _keeps_own_blocks(call.selection)
            and kept_per_query_block(call.selection.valid) is not None)


def _split_sdpa_run(c: BlockCall) -> Tensor:
    sel = c.selection
    return split_sdpa_attention(c.query, c.key, c.value, sel.indices, sel.valid, sel.geometry, scale=c.scale,
                                block_bias=c.block_bias, workspace=c.workspace)


def _gather_sdpa_supports(call: BlockCall, explicit: bool) -> bool:
    # the selection itself: every causal row keeps its own block (the only one it masks)
    return _sdpa_expressible(call) and _keeps_own_blocks(call.selection)


def _gather_sdpa_run(c: BlockCall) -> Tensor:
    sel = c.selection
    return gather_sdpa_attention(c.query, c.key, c.value, sel.indices, sel.valid, sel.geometry, scale=c.scale,
                                 block_bias=c.block_bias)


def _portable_run(c: BlockCall) -> Tensor:
    sel = c.selection
    return block_sparse_attention(
        c.query, c.key, c.value, sel.indices, sel.valid, sel.geometry, scale=c.scale, block_bias=c.block_bias,
        allowed=c.allowed, bias=c.bias, softcap=c.softcap, sinks=c.sinks, dropout_p=c.dropout_p,
        mods=c.mods, chunk_elements=c.chunk_elements, checkpoint=c.checkpoint,
    )


BLOCK_KERNELS: dict[str, BlockKernel] = {
    k.name: k
    for k in (
        BlockKernel("paged_cpu", _paged_cpu_supports, _paged_cpu_run,
                    "it takes a decoding step on the CPU (float32, bfloat16, float16, float64) without a gradient, "
                    "the model's mask, the gate's term, a bias, soft-cap, sinks, dropout or other modifiers, where its "
                    "C++ kernel builds"),
        BlockKernel("paged_decode", _paged_decode_supports, _paged_decode_run,
                    "it takes one query per head (a decoding step) without a bias, soft-cap, sinks, dropout, other "
                    "modifiers or a mask that differs between heads"),
        BlockKernel("flex", _flex_supports, _flex_run,
                    "FlexAttention has no CPU backward, no learned sinks, dropout or other modifiers, and needs the queries "
                    "aligned to blocks"),
        BlockKernel("split_sdpa", _split_sdpa_supports, _split_sdpa_run,
                    "not on the CPU, not causal, a single query block, or the call has the model's own mask, a bias, "
                    "soft-cap, sinks, dropout, other modifiers or a gate gradient, or a causal row without its own block, "
                    "or the rows of a query block keep different numbers of blocks", takes_workspace=True),
        BlockKernel("gather_sdpa", _gather_sdpa_supports, _gather_sdpa_run,
                    "not on the CPU, or the call has the model's own mask, a bias, soft-cap, sinks, dropout, other "
                    "modifiers or a gate gradient, or a causal row without its own block"),
        BlockKernel("portable", lambda call, explicit: True, _portable_run, ""),
    )
}


def choose_block_kernel(call: BlockCall, name: str = "auto") -> BlockKernel:
    """The kernel that runs ``call``: ``name``'s (ValueError if it cannot), or the first that supports it."""
    if name != "auto":
        kernel = BLOCK_KERNELS.get(name)
        if kernel is None:
            raise ValueError(f"no block-sparse kernel {name!r}; kernels: {', '.join(BLOCK_KERNELS)}")
        if not kernel.supports(call, True):
            raise ValueError(f"the {name} block-sparse kernel cannot run this call ({kernel.cannot}); "
                             "use kernel='portable' or 'auto'")
        return kernel
    return next(k for k in BLOCK_KERNELS.values() if k.supports(call, False))


__all__ = ["BLOCK_KERNELS", "BlockCall", "BlockKernel", "choose_block_kernel"]
