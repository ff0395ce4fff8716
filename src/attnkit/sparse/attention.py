"""``sparse_attention``: block-sparse attention for a model, through the seam.

    cfg = SparseConfig(pattern="moba", density=0.25)
    with sparse_attention(model, cfg) as handle:
        model(input_ids=ids).loss.backward()
    handle.density()                     # the share of candidate key blocks kept, measured
    with sparse_attention(model, cfg, keep_masks=True) as handle:
        model(input_ids=ids)
    handle.block_masks                   # {Site: (B, Hkv, nQb, nKb) bool} the blocks this forward kept

How it reaches the calls: a session (``attach``) whose mask modifier is a ``SparseSelector``
and whose kernel is ``block_sparse``, an entry of attnkit's kernel registry. For each call the
kernel asks the pattern for block scores (the learned gate: its site's ``BlockGate``), keeps the
forced blocks and the best ones up to the density's budget (``blocks.select_blocks``), and runs
the first block-sparse kernel that can over them (``seam.kernels.block_kernels``: FlexAttention on
CUDA, SDPA on the gathered blocks on the CPU, else the portable gather kernel). The selector is also an ordinary
FlexAttention ``mask_mod`` of the call's last selection, so taps attached to the same model see
the probabilities of the blocks kept. On leaving the block (also through an exception) the
model is exactly as it was: ``attach``'s contract.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.errors import UserError
from attnkit.seam.kernels import KERNELS, Kernel
from attnkit.seam import AttentionSession, Site, attach
from attnkit.seam.call import AttentionCall, causal_allowed, split_mask
from attnkit.seam.plan import Mods
from attnkit.seam.session import in_backward
from attnkit.seam.kernels.block_kernels import BlockCall, choose_block_kernel
from attnkit.seam.kernels import paged_cpu
from attnkit.seam.kernels.blocks import BlockGeometry, BlockSelection, block_geometry, keep_best
from attnkit.seam.kernels.paged_decode import (all_valid, is_decoding_step, is_padding_mask, select_step_pages,
                                               step_budget)
from attnkit.seam.kernels.workspace import Workspace
from attnkit.sparse.config import SparseConfig
from attnkit.sparse.gates import SparseGates
from attnkit.sparse.page_stats import PageStats
from attnkit.sparse.patterns import BlockInputs, get_pattern
from attnkit.seam.taps import Tap

KERNEL_NAME = "block_sparse"


class SparseHandle:
    """What ``sparse_attention`` yields: measurements of the calls seen, and this forward's gate scores.

    gate_log_probs: {Site: (B, Hkv, nQb, nKb)} the gate's log-softmax over candidate key blocks
        (-inf elsewhere) of this forward, with gradient (learned patterns; empty otherwise).
    kernels: how many calls ran on each block-sparse kernel (``BLOCK_KERNELS``: "paged_cpu",
        "paged_decode", "flex", "split_sdpa", "gather_sdpa", "portable").

    With ``keep_masks`` (``sparse_attention(..., keep_masks=True)``), also what each forward kept,
    held until the next forward starts (without it, reading them is an error: a training step
    then holds nothing of its selections but what its backward needs):

    block_masks: {Site: (B, Hkv, nQb, nKb) bool} the blocks kept at each site in this forward.
    block_bias: {Site: (B, Hkv, nQb, nKb)} the value the gate added to each kept block's scores in
        this forward (``gate_bias`` · log p under ``gate_grad="prior"``; absent when nothing is added),
        detached: sparse probabilities = softmax over the kept keys of scores + this.
    """

    def __init__(self, cfg: SparseConfig, gates: SparseGates | None, keep_masks: bool = False) -> None:
        self.cfg, self.gates, self.keep_masks = cfg, gates, keep_masks
        self.gate_log_probs: dict[Site, Tensor] = {}
        self._block_masks: BlockMasks = BlockMasks()
        self._block_bias: dict[Site, Tensor] = {}
        self.kernels: Counter = Counter()
        self._kept: Counter = Counter()
        self._candidates: Counter = Counter()

    def start_forward(self) -> None:
        self.gate_log_probs, self._block_masks, self._block_bias = {}, BlockMasks(), {}

    def record(self, site: Site, sel: BlockSelection, kernel: str, bias: Tensor | None = None) -> None:
        """Count the call's blocks and, with ``keep_masks``, keep its selection (its block mask is
        made when asked for) and the gate's term."""
        self._kept[site] += sel.kept_blocks()
        if is_decoding_step(sel.geometry):  # every page is a candidate: counted without the (1, nKb) table
            self._candidates[site] += sel.indices.shape[0] * sel.indices.shape[1] * sel.geometry.n_key_blocks
        else:
            self._candidates[site] += sel.candidate_blocks()
        if sel.log_probs is not None:
            self.gate_log_probs[site] = sel.log_probs
        if self.keep_masks:
            self._block_masks[site] = sel
            if bias is not None:
                self._block_bias[site] = bias
        self.kernels[kernel] += 1

    def _kept_record(self, name: str):
        if not self.keep_masks:
            raise UserError(f"handle.{name}: the blocks each forward kept are held only when asked for: "
                            "sparse_attention(model, cfg, keep_masks=True)")
        return self._block_bias if name == "block_bias" else self._block_masks

    @property
    def block_masks(self) -> Mapping[Site, Tensor]:
        """{Site: (B, Hkv, nQb, nKb) bool} the blocks kept at each site in the last forward (``keep_masks``)."""
        return self._kept_record("block_masks")

    @property
    def kept_blocks(self) -> Mapping[Site, Tensor]:
        """``block_masks`` by another name: {Site: (B, Hkv, nQb, nKb) bool} of the last forward."""
        return self._kept_record("kept_blocks")

    @property
    def block_bias(self) -> dict[Site, Tensor]:
        """{Site: (B, Hkv, nQb, nKb)} the gate's term on each kept block in the last forward (``keep_masks``)."""
        return self._kept_record("block_bias")

    def density(self, site: Site | None = None) -> float:
        """Kept / candidate key blocks over every call seen (of ``site``, or of all sites)."""
        kept = self._kept[site] if site is not None else sum(self._kept.values())
        cand = self._candidates[site] if site is not None else sum(self._candidates.values())
        return kept / cand if cand else float("nan")

    def densities(self) -> dict[Site, float]:
        return {s: self.density(s) for s in sorted(self._candidates)}

    def reset(self) -> None:
        self._kept.clear()
        self._candidates.clear()
        self.kernels.clear()


class BlockMasks(Mapping):
    """{Site: (B, Hkv, nQb, nKb) bool} the blocks kept at each site, each made from its call's
    selection when first read (a decoding step makes none it is not asked for)."""

    def __init__(self) -> None:
        self._by_site: dict[Site, Tensor | BlockSelection] = {}

    def __setitem__(self, site: Site, sel: BlockSelection) -> None:
        self._by_site[site] = sel

    def __getitem__(self, site: Site) -> Tensor:
        mask = self._by_site[site]
        if isinstance(mask, BlockSelection):
            mask = self._by_site[site] = mask.block_mask()
        return mask

    def __iter__(self) -> Iterator[Site]:
        return iter(self._by_site)

    def __len__(self) -> int:
        return len(self._by_site)


class SparseSession(AttentionSession):
    """An attention session whose calls run block-sparse; it tells its handle when a forward starts."""

    def __init__(self, selector: "SparseSelector", handle: SparseHandle, layers=None, chunk_elements: int = 1 << 21) -> None:
        super().__init__(taps=[_CallMarker(selector)], mask_mods=[selector], score_mods=[selector.gate_bias],
                         kernel=KERNEL_NAME, layers=layers, chunk_elements=chunk_elements)
        self.handle = handle
        self.selector = selector

    def answer_plain(self, module: nn.Module, site: Site, query: Tensor, key: Tensor, value: Tensor,
                     mask: Tensor | None, scale: float) -> Tensor | None:
        return self.selector.paged_step(module, site, query, key, value, mask, scale)

    def start_forward(self) -> None:
        super().start_forward()
        self.handle.start_forward()


class SparseSelector:
    """The block selection of a session, as a FlexAttention ``mask_mod`` of the call's last selection.

    ``run`` (the ``block_sparse`` kernel) selects the blocks of a call and computes its output;
    ``__call__(b, h, q_idx, kv_idx)`` answers whether that key is in a kept block of that query.
    """

    def __init__(self, cfg: SparseConfig, gates: SparseGates | None, handle: SparseHandle,
                 workspace_bytes: dict[Site, int] | None = None) -> None:
        self.cfg, self.gates, self.handle = cfg, gates, handle
        # each site's last call's workspace size: a call's temporaries are carved from one
        # allocation of that size (``Workspace``), released before the call's attention runs
        self.workspace_bytes = {} if workspace_bytes is None else workspace_bytes
        self.pattern = get_pattern(cfg.pattern)
        self._last: tuple[BlockSelection, int] | None = None  # the call's selection, its KV groups
        self._last_bias: Tensor | None = None  # (B, Hkv, nQb, nKb) gate_bias · log p, detached
        self.__name__ = f"sparse_{cfg.pattern}_{cfg.density:g}"
        self.gate_bias = GateBias(self)
        self._fresh = False  # the selection in _last is this call's (set by run, cleared as a call starts)
        self.pages = PageStats()  # each site's key-page statistics, kept across the steps of a KV cache
        # a decoding step may go straight to the pattern's pages and the C++ paged kernel
        # (``paged_step``): a training-free pattern, causal calls, the kernel auto-chosen or that one
        self._straight_steps = (not self.pattern.learned and cfg.causal is not False
                                and cfg.kernel in ("auto", "paged_cpu"))
        self._per_mask: dict[str, tuple] = {}  # _from_mask's last mask and answer, by question

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if self._last is None or not self._fresh:
            raise RuntimeError("the sparse selection is made by the block_sparse kernel, but another kernel runs this "
                               "call (a session stacked on it asks for kernel=...): leave that session's kernel 'auto'")
        sel, groups = self._last
        geo = sel.geometry
        qb = (q_idx // geo.block_size - geo.first_block).clamp(0, geo.n_query_blocks - 1)
        return sel.block_mask()[b, h // groups, qb, kv_idx // geo.block_size]

    def forget_masks(self) -> None:
        """Drop the model's masks kept to share work between the layers of one forward, and the last
        call's selection and gate term (read by taps during that call only)."""
        self._per_mask.clear()
        self._last = self._last_bias = None

    def _from_mask(self, question: str, allowed: Tensor, shape: tuple, answer):
        """``answer()`` for the model's mask ``allowed`` over ``shape``, reused while the mask is the
        same tensor, unchanged: the layers of a forward share the model's mask."""
        seen = self._per_mask.get(question)
        if seen is None or seen[0] is not allowed or seen[1] != allowed._version or seen[2] != shape:
            seen = self._per_mask[question] = (allowed, allowed._version, shape, answer())
        return seen[3]

    def _written_keys(self, k: Tensor, v: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """k, v (B, Hkv, K, D) and the mask up to the last written key (views; ``_written_extent``),
        the mask None where it hides none of them. The extent is reused while the mask is the same
        tensor, unchanged, over as many keys: the layers of a decoding step share the model's mask."""
        K = k.shape[2]
        end, masked = self._from_mask("written", allowed, (K,), lambda: _written_extent(allowed, K))
        return k[:, :, :end], v[:, :, :end], allowed[..., :end] if masked else None

    def _written_prefix(self, Q: int, K: int, allowed: Tensor) -> int | None:
        """The written keys of a prompt of Q queries over K slots whose mask ``allowed`` is exactly
        causal over them and hides every slot after them (``_causal_prefix``), or None. Reused while
        the mask is the same tensor, unchanged: the layers of a forward share the model's mask."""
        return self._from_mask("prefix", allowed, (K, Q), lambda: _causal_prefix(allowed, K, Q))

    def select(self, call: AttentionCall, workspace: Workspace | None = None,
               ) -> tuple[BlockSelection, Tensor, Tensor, Tensor | None]:
        """The call's selection, its per-KV-group key and value (B, Hkv, K, D) and its mask (True =
        may attend, or None), the keys a decoding step's mask never shows at the end cut off.
        ``workspace``: where the selection's temporaries are carved from."""
        groups = call.kv_groups
        k, v = call.key_heads, call.value_heads  # the model's own KV heads
        gate = None
        if self.pattern.learned:
            if self.gates is None:
                raise UserError(f"the {self.cfg.pattern} pattern needs gates: make_gates(model, cfg)")
            if call.site not in self.gates:
                raise UserError(f"no gate for {call.site}: the gates were made for another model "
                                f"({', '.join(map(str, self.gates.sites))})")
            gate = self.gates[call.site]
            shape = (k.shape[1], groups, k.shape[-1])
            if (gate.num_kv_heads, gate.groups, gate.head_dim) != shape:
                raise UserError(f"the gate of {call.site} was made for (KV heads, group size, head dim) "
                                f"{(gate.num_kv_heads, gate.groups, gate.head_dim)}, the call has {shape}")
        cfg = self.cfg.at_layer(call.site.layer)  # the layer's own density under layer_shares
        allowed, prefix = call.allowed, None
        if self.cfg.causal is not False and allowed is not None and call.query_length > 1:
            # a prompt into a preallocated cache: the model's mask is the causal one over the written
            # keys with the unwritten slots hidden; over the written keys alone the call is causal and
            # needs no mask (and runs on the SDPA kernels). Any other mask (padding, a window) is kept.
            prefix = self._written_prefix(call.query_length, k.shape[2], allowed)
        if prefix is not None:
            causal, k, v, allowed = True, k[:, :, :prefix], v[:, :, :prefix], None
        else:
            causal = is_causal_call(call) if self.cfg.causal is None else self.cfg.causal
        if causal and call.query_length == 1 and allowed is not None:
            # a preallocated cache (StaticCache) passes every slot, the unwritten ones hidden: the
            # step's query is the last key its mask shows, and the pages end there
            k, v, allowed = self._written_keys(k, v, allowed)
        pages = None
        if causal and k.shape[2] > call.query_length:
            # the queries follow a cache's keys: the pages' statistics are kept across calls (a call
            # without keys before its queries, a prompt or a training step, pools its keys and keeps
            # nothing; a first decoding step after it pools the cache once and keeps that)
            past = k.shape[2] - call.query_length
            pages = lambda: self.pages.update(call.site, k, self.cfg.block_size, past=past)  # noqa: E731
        sel = choose_blocks(call.query, k, cfg, gate=gate, causal=causal, allowed=allowed, key_pages=pages,
                            workspace=workspace)
        return sel, k, v, allowed

    def paged_step(self, module: nn.Module, site: Site, query: Tensor, key: Tensor, value: Tensor,
                   mask: Tensor | None, scale: float) -> Tensor | None:
        """A decoding step's output (B, H, 1, Dv) computed as ``run`` computes it with the kernel it
        would choose (the pattern's pages, then ``paged_cpu``'s C++ attention over them), for a call
        the seam hands over whole (``AttentionSession.answer_plain``): the same selection, output and
        record, without the general path's plumbing, whose Python costs as much as the step's
        attention at batch 1. It runs for one query at the end of its keys (K >= 2), a causal call as
        ``is_causal_call`` says (with a mask, any one-query call; without one, a module not marked
        ``is_causal = False``, or ``causal=True``), a mask (bool, or additive without a bias where it
        shows) that hides at most padding (one row per batch row), a training-free pattern, the ``auto`` or
        ``paged_cpu`` kernel, and tensors the C++ kernel takes (the CPU, one dtype, no gradient); None
        otherwise: ``run`` sees the call."""
        if query.shape[2] != 1 or not self._straight_steps:
            return None
        if self.cfg.causal is None and not is_causal_step(module, masked=mask is not None):
            return None
        if mask is not None:
            if mask.dtype != torch.bool:  # an additive mask (an eager model's): the same split as ``build_call``'s
                mask, bias = self._from_mask("split", mask, (), lambda: split_mask(mask))
                if bias is not None:
                    return None
            # a preallocated cache: its unwritten slots cut off, as ``select`` cuts them; what is left
            # of the mask hides padding (one row per batch row, for every head), or the call is declined
            key, value, mask = self._written_keys(key, value, mask)
            if mask is not None and not is_padding_mask(mask, key.shape[2]):
                return None
        K = key.shape[2]
        if K < 2 or query.shape[1] % key.shape[1] or not paged_cpu.supports(query, key, value) or paged_cpu.load() is None:
            return None
        cfg = self.cfg.at_layer(site.layer)
        pages = lambda: self.pages.update(site, key, cfg.block_size, past=K - 1)  # noqa: E731
        sel = choose_blocks(query, key, cfg, causal=True, allowed=mask, key_pages=pages)
        out = paged_cpu.paged_attention(query, key, value, sel.indices, cfg.block_size, scale, allowed=mask)
        self._last, self._fresh, self._last_bias = (sel, query.shape[1] // key.shape[1]), True, None
        self.handle.record(site, sel, "paged_cpu")
        return out

    def run(self, call: AttentionCall, others: Mods, chunk_elements: int) -> Tensor:
        # a decoding step's temporaries are a few bytes: no workspace, and its size does not replace
        # the prompt's at the site
        workspace = None if call.query_length == 1 else Workspace(self.workspace_bytes.get(call.site, 0))
        sel, k, v, allowed = self.select(call, workspace)
        block_bias = full_bias = None
        log_probs = sel.log_probs
        straight = self.cfg.gate_grad == "straight_through"
        if log_probs is not None and self.cfg.gate_bias and not (straight and not log_probs.requires_grad):
            if straight:  # value 0, gradient of log p: the output is plain attention over the kept blocks
                log_probs = log_probs - log_probs.detach()
            picked = torch.gather(log_probs, -1, sel.indices)  # (B, Hkv, nQb, S)
            block_bias = self.cfg.gate_bias * torch.where(sel.valid, picked, 0.0)
            full_bias = self.cfg.gate_bias * torch.where(sel.geometry.candidates, log_probs, 0.0)
        block_call = BlockCall(
            call.query, k, v, sel, call.scale, block_bias=block_bias, full_bias=full_bias, allowed=allowed,
            bias=None if call.bias is None else call.bias[..., : k.shape[2]], softcap=call.softcap, sinks=call.sinks,
            dropout_p=call.dropout_p, mods=others or None,
            chunk_elements=self.cfg.chunk_elements, checkpoint=self.cfg.checkpoint, workspace=workspace,
        )  # the causal triangle is applied inside the kernels
        try:
            kernel = choose_block_kernel(block_call, self.cfg.kernel)
        except ValueError as e:
            raise UserError(str(e)) from None
        if workspace is not None and not kernel.takes_workspace:
            workspace.release()  # the selection's temporaries are done and the kernel carves none
        out = kernel.run(block_call)
        if workspace is not None:
            self.workspace_bytes[call.site] = workspace.used
        if not is_decoding_step(sel.geometry):  # what is kept of the call until the next: its block numbers, small
            sel = sel.compact()
        self._last = (sel, call.kv_groups)
        self._fresh = True
        self._last_bias = None if block_bias is None or straight else full_bias.detach()
        if not in_backward():  # a checkpoint recompute is not a new call
            self.handle.record(call.site, sel, kernel.name, self._last_bias)
        return out


class _CallMarker(Tap):
    """Tells the selector that a new call starts (the seam announces each call before its kernel
    runs), so the selection of the previous call is never taken for this one's."""

    wants_call, wants_chunks = True, False

    def __init__(self, selector: SparseSelector) -> None:
        self.selector = selector

    def on_call(self, call: AttentionCall) -> None:
        self.selector._fresh = False


class GateBias:
    """The learned gate's term of the call's last selection as a FlexAttention ``score_mod``:
    ``gate_bias · log p(block)`` on the scores of kept blocks (nothing for training-free patterns).
    With ``SparseSelector`` as the mask, taps see exactly the probabilities the kernel used."""

    def __init__(self, selector: SparseSelector) -> None:
        # the selector owns this term: a weak reference back, so that the two are no reference
        # cycle and a session's last selection is freed when the session is (not by the collector)
        self._selector = weakref.ref(selector)
        self.__name__ = "sparse_gate_bias"

    @property
    def selector(self) -> SparseSelector:
        selector = self._selector()
        if selector is None:
            raise RuntimeError("the sparse session of this gate term has ended")
        return selector

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        selector = self.selector
        bias, last = selector._last_bias, selector._last
        if bias is None or last is None:
            return score
        sel, groups = last
        geo = sel.geometry
        qb = (q_idx // geo.block_size - geo.first_block).clamp(0, geo.n_query_blocks - 1)
        kb = (kv_idx // geo.block_size).clamp(max=geo.n_key_blocks - 1)
        term = bias[b, h // groups, qb, kb]
        return score + torch.where(torch.isfinite(term), term, 0.0)  # future blocks are masked anyway


def choose_blocks(q: Tensor, k: Tensor, cfg: SparseConfig, gate=None, causal: bool = True,
                  allowed: Tensor | None = None, key_pages=None, workspace: Workspace | None = None) -> BlockSelection:
    """The key blocks ``cfg``'s pattern keeps for queries q (B, H, Q, D) at the end of keys
    k (B, Hkv, K, D): forced blocks, then the best-scored up to the density's budget. A learned
    pattern's ``gate`` (a ``BlockGate``) scores with gradient; its log-probabilities over the
    candidate blocks come back in ``log_probs``. The gate sees q and k detached: it learns from
    the model's queries and keys but does not push them. ``allowed``: the call's own mask (True =
    may attend, broadcastable to (B, H, Q, K)); a block it hides entirely (padding, outside a
    sliding window) is chosen only after every block it does not hide. ``key_pages``: a function
    giving the (mean, max, min) of each key block when they are kept elsewhere (``PageStats``).
    ``workspace``: where the selection's temporaries are written (``seam.kernels.workspace``)."""
    pattern = get_pattern(cfg.pattern)
    geo = block_geometry(cfg.block_size, q.shape[2], k.shape[2], causal, q.device)
    # a learned gate may keep its inputs for its backward: its pooled means are never scratch
    x = BlockInputs(q.detach(), k.detach(), geo, q.shape[1] // k.shape[1], gate, key_pages,
                    None if pattern.learned else workspace)
    if (pattern.step_pages is not None and is_decoding_step(geo) and not pattern.learned
            and (allowed is None or pattern.masked_steps)):
        kept, local, first = step_budget(geo.n_key_blocks, cfg.density, cfg.sink_blocks, cfg.local_blocks,
                                         cfg.keeps_sinks)
        masked = {"allowed": allowed} if allowed is not None else {}
        pages = pattern.step_pages(x, kept, local, first, **masked)  # (B, Hkv, kept), or None where it cannot
        if pages is not None:
            return BlockSelection(indices=pages.unsqueeze(2), valid=all_valid(kept, q.device), geometry=geo,
                                  every_slot=True)
    log_probs = None
    if pattern.learned:
        scores = pattern.score(x).float()
        log_probs = torch.log_softmax(scores.masked_fill(~geo.candidates, float("-inf")), dim=-1)
    else:
        with torch.no_grad():
            scores = pattern.score(x)
    del x  # its pooled queries and keys: freed before the selection's own temporaries are made
    scores = scores.expand(k.shape[0], k.shape[1], geo.n_query_blocks, geo.n_key_blocks)  # (B, Hkv, nQb, nKb)
    if allowed is not None:  # below every visible block, above the non-candidates (-inf)
        scores = scores.detach().float().masked_fill(~visible_blocks(allowed, geo), torch.finfo(torch.float32).min)
    if is_decoding_step(geo):  # one query row: the same selection in a few ops
        sel = select_step_pages(scores, geo, cfg.density, cfg.sink_blocks, cfg.local_blocks, cfg.keeps_sinks)
    else:
        forced, _, valid = geo.selection_budget(cfg.density, cfg.sink_blocks, cfg.local_blocks, cfg.keeps_sinks)
        sel = keep_best(scores, geo, forced, valid, workspace)
    sel.log_probs = log_probs
    return sel


def _written_extent(allowed: Tensor, K: int) -> tuple[int, bool]:
    """(end, masked) for a decoding step's mask ``allowed`` (B|1, H|1, 1, K' >= K) over K keys: the
    keys up to the last one any row may see (the slots of a preallocated cache not yet written are
    cut off, so that the step's query is at the end of its keys, as the page selection assumes), and
    whether the mask hides any of those (False: no padding, no mask to apply)."""
    rows = allowed[..., :K].reshape(-1, K)  # (rows, K)
    if not rows.shape[0]:  # an empty batch: nothing to cut
        return K, False
    seen = int(rows.sum(-1).max())
    if seen and bool(rows[:, :seen].all()):  # every row sees the first keys and nothing after them
        return seen, False
    shown = (rows[0] if rows.shape[0] == 1 else rows.any(0)).nonzero()  # (n, 1) the keys some row sees
    if not len(shown):
        return K, True
    end = int(shown[-1]) + 1
    # one row: it hides a written key when it sees fewer than ``end``
    return end, len(shown) != end if rows.shape[0] == 1 else not bool(rows[:, :end].all())


def _causal_prefix(allowed: Tensor, K: int, Q: int) -> int | None:
    """The number of written keys ``end`` < K when the mask ``allowed`` (B|1, H|1, Q, K' >= K) of Q
    queries over K keys is exactly the causal one over keys 0..end-1 (query i sees keys 0..end-Q+i,
    every batch row and head alike) and hides keys end..K-1: a prompt written into the first ``end``
    slots of a preallocated cache. None for any other mask (padding, a sliding window, a per-row
    pattern) or one that hides no slot at the end."""
    if allowed.shape[-2] != Q:
        return None
    mask = allowed[..., :K]
    last = mask[..., -1, :].reshape(-1, K)  # the last query's row of every batch row and head
    end = K - int(last.any(0).flip(0).int().argmax())  # a causal mask's last row ends at the last written key
    if not Q <= end < K or bool(mask[..., end:].any()):
        return None
    written = mask[..., :end]
    return end if torch.equal(written, causal_allowed(Q, end, mask.device)[0, 0].expand(written.shape)) else None


def visible_blocks(allowed: Tensor, geo: BlockGeometry) -> Tensor:
    """(B|1, 1, nQb|1, nKb) bool: whether any query of the block may see any key of the block
    under the call's own mask ``allowed`` (B|1, H|1, Q|1, K') — over all heads, conservatively."""
    mask = allowed[..., : geo.key_length].any(1, keepdim=True)  # (B, 1, Q|1, K)
    mask = F.pad(mask, (0, geo.padded_keys - geo.key_length))
    B, _, Qm, _ = mask.shape
    if Qm == 1:  # a key-padding mask: the same for every query block
        return mask.view(B, 1, 1, geo.n_key_blocks, geo.block_size).any(-1)
    mask = F.pad(mask, (0, 0, geo.front, geo.padded_queries - geo.front - geo.query_length))
    return mask.view(B, 1, geo.n_query_blocks, geo.block_size, geo.n_key_blocks, geo.block_size).any(-1).any(3)


def is_causal_call(call: AttentionCall) -> bool:
    """Whether the call's mask hides every future key (then blocks after the query's are never candidates)."""
    if call.is_causal:
        return True
    if call.allowed is not None and call.query_length > call.key_length:
        return False
    if call.query_length == 1:
        return is_causal_step(call.module, masked=call.allowed is not None)
    if call.allowed is None:
        return False
    allowed = call.allowed[..., : call.key_length]
    if allowed.shape[-2] == 1 and call.query_length > 1:
        return False
    future = ~causal_allowed(call.query_length, call.key_length, allowed.device)
    return not bool((allowed & future).any())


def is_causal_step(module: nn.Module, masked: bool) -> bool:
    """Whether a call of one query at the end of its keys is causal: with a mask, always (no key is
    in its future, whatever the mask); without one, it is a decoding step of a causal model unless
    the module says it is not causal (an encoder, cross-attention). ``is_causal_call``'s rule for
    one query, and ``SparseSelector.paged_step``'s before any call is built."""
    return masked or bool(getattr(module, "is_causal", True))


def _supports(call: AttentionCall, mods: Mods, explicit: bool) -> bool:
    return any(isinstance(m, SparseSelector) for m in mods.mask)


def _run(call: AttentionCall, mods: Mods, chunk_elements: int) -> Tensor:
    selector = next(m for m in mods.mask if isinstance(m, SparseSelector))
    others = Mods(tuple(m for m in mods.score if m is not selector.gate_bias),
                  tuple(m for m in mods.mask if m is not selector))
    return selector.run(call, others, chunk_elements)


KERNELS.setdefault(KERNEL_NAME, Kernel(KERNEL_NAME, _supports, _run))

# the workspace each site of a model needed at its last call (bytes): the next call's workspace
# is made that large at once, kept while the model lives (a few numbers; the workspaces themselves
# last one call)
_WORKSPACE_BYTES: "weakref.WeakKeyDictionary[nn.Module, dict[Site, int]]" = weakref.WeakKeyDictionary()


def workspace_bytes(model: nn.Module) -> dict[Site, int]:
    """{Site: bytes} the workspace of each site's last sparse call of ``model`` needed (``Workspace``)."""
    sizes = _WORKSPACE_BYTES.get(model)
    if sizes is None:
        sizes = _WORKSPACE_BYTES[model] = {}
    return sizes


@contextmanager
def sparse_attention(
    model: nn.Module, cfg: SparseConfig, gates: SparseGates | None = None, layers: Sequence[int | Site] | None = None,
    *, keep_masks: bool = False,
) -> Iterator[SparseHandle]:
    """Inside the ``with`` block every attention call of ``model`` (of ``layers``, if given) runs
    block-sparse as ``cfg`` says; gradients reach the gates and whatever of the model requires
    grad. The model is left exactly as found, also on an exception. ``keep_masks``: the handle
    keeps the blocks each forward kept (``SparseHandle.block_masks``, ``block_bias``) until the
    next forward; off, a step holds nothing of its selections but what its backward needs."""
    pattern = get_pattern(cfg.pattern)
    if pattern.learned and gates is None:
        raise UserError(f"the {cfg.pattern} pattern needs gates: sparse_attention(model, cfg, gates=make_gates(model, cfg))")
    handle = SparseHandle(cfg, gates, keep_masks)
    selector = SparseSelector(cfg, gates, handle, workspace_bytes(model))
    session = SparseSession(selector, handle, layers=layers, chunk_elements=cfg.chunk_elements)
    awaiting_backward: list[list[bool]] = []  # per checkpointed forward with gradients: [its backward not yet run]

    def after_forward(module, args, output) -> None:
        # the masks the layers of one forward share are dropped when it returns (a prompt's (Q, K)
        # mask is 67 MB at 8k tokens), and the last call's selection: nothing of a forward outlives
        # it in the selector (what a backward needs, its autograd graph keeps)
        selector.forget_masks()
        if torch.is_grad_enabled() and _checkpointing(model):
            watched = _output_tensor(output)
            if watched is not None and watched.requires_grad:
                waiting = [True]
                awaiting_backward.append(waiting)
                watched.register_hook(lambda grad: waiting.__setitem__(0, False))

    with attach(model, session):
        hook = model.register_forward_hook(after_forward)
        try:
            yield handle
        finally:
            hook.remove()
    if any(waiting[0] for waiting in awaiting_backward):
        warnings.warn(
            "sparse_attention: a forward with gradients ran inside the block and its backward has not: the model "
            "recomputes activations in the backward (gradient checkpointing), and outside the block it recomputes "
            "them with its own attention, which torch stops with a CheckpointError. Run backward inside the "
            "`with sparse_attention(...)` block.", UserWarning, stacklevel=3)


def _checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model recomputes its layers in the backward, by either name transformers
    gives it (``is_activation_checkpointing``; ``is_gradient_checkpointing`` in older releases)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _output_tensor(output) -> Tensor | None:
    """The tensor of a model's output a backward of it reaches: the logits, else the first tensor."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, Tensor)), None)
