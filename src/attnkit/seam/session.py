"""The attention session, and ``run_call``: plan → kernel → taps, for every attention call.

Adapters (``adapters/hf.py``, ``mha.py``, ``protocol.py``) turn a model's attention call into an
``AttentionCall`` and hand it to ``run_call`` with the sessions attached to the module. For each
call:

1. **plan**: each session says whether it touches the call's site, on which heads, with which
   score/mask modifiers, and whether this forward is observed;
2. **kernel**: one kernel computes the output with every session's modifiers
   (``attnkit.seam.kernels``: the model's own kernel when nothing changes or a temperature folds
   into its scale, else dense/flex);
3. **taps**: each observing session's taps see the call — its logits and probabilities in a
   separate ``no_grad`` pass on detached tensors, its output, the gradient of its output.

Calls made while autograd recomputes a checkpointed segment (inside backward) get the same
kernel and modifiers but no taps, so a row is counted once.

One shortcut: a session alone on a module may compute a plain call itself before any of this
(``AttentionSession.answer_plain``, asked by ``answer_alone``): a sparse decoding step is three C++
calls, and the general path's Python would cost as much as they do at batch 1.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit.seam.eager import eager_under_compile
from attnkit.seam import kernels
from attnkit.seam.call import AttentionCall
from attnkit.seam.observe import observe_call
from attnkit.seam.plan import Mods, Plan, on_heads
from attnkit.seam.sites import Site, SiteTable
from attnkit.seam.taps import Tap


class AttentionSession:
    """What to do with attention calls while attached to a model.

    taps: each sees the observed heads of every observed call (``attnkit.seam.taps``).
    score_mods / mask_mods: FlexAttention-signature modifiers (``attnkit.seam.mods``, ``attnkit.seam.mods.mask``)
        applied to the selected layers and heads; every other call runs on the model's own kernel.
    layers / heads / sample_rows / every: see ``Plan``.
    kernel: "auto" or a name in ``attnkit.seam.kernels.KERNELS`` for the calls this session modifies.
    query_mask: (B, Q) bool, False for padding queries, so they do not count in statistics.
    active: False leaves the session attached at the cost of a lookup per call: nothing is
        observed or changed (a training loop switches it per step).
    """

    def __init__(
        self,
        taps: Iterable[Tap] = (),
        score_mods: Sequence = (),
        mask_mods: Sequence = (),
        layers: Iterable[int | Site] | None = None,
        heads: Sequence[int] | dict[int, Sequence[int]] | None = None,
        sample_rows: int | None = None,
        every: int = 1,
        kernel: str = "auto",
        seed: int = 0,
        chunk_elements: int = 1 << 21,
    ) -> None:
        self.taps = list(taps)
        self.plan = Plan.build(layers, heads, sample_rows, every, score_mods, mask_mods)
        self.kernel = kernel
        self.generator = torch.Generator().manual_seed(seed)
        self.chunk_elements = chunk_elements
        self.query_mask: Tensor | None = None
        self.active = True
        self.forwards = 0  # forwards started while attached
        self.sites_seen: set[Site] = set()

    def start_forward(self) -> None:
        self.forwards += 1
        if self.observing:
            for tap in self.taps:
                tap.start_forward()

    @property
    def observing(self) -> bool:
        """Whether this forward's calls are shown to the taps (``every``; ``active``)."""
        return self.active and bool(self.taps) and (self.forwards - 1) % self.plan.every == 0

    def answer_plain(self, module: nn.Module, site: Site, query: Tensor, key: Tensor, value: Tensor,
                     mask: Tensor | None, scale: float) -> Tensor | None:
        """The output (B, H, Q, Dv) of a plain call that this session computes on its own, or None
        (the default): the call then takes the general path (plan, kernel, taps).

        The seam asks before it builds the call (``answer_alone``), and only when this session is
        the only one on the module, active, on every head of a site it touches, outside a
        checkpoint's recompute, for a call with no position bias, soft-cap, sinks or dropout.
        query: (B, H, Q, D); key, value: the model's own KV heads (B, Hkv, K, D|Dv); mask: the
        model's, as its attention function got it (None, bool, or additive: one that may carry a
        bias is the session's to split or to decline). A session whose whole work on some calls is
        one kernel (a sparse decoding step) answers them here without the general path's cost per
        call; it returns None for any call it cannot compute exactly as the general path would."""
        return None


class Dispatch:
    """What the attached sessions do with one call: the modifiers (of every session, confined to
    its heads), the kernel asked for, and the sessions whose taps observe it."""

    def __init__(self, call: AttentionCall, sessions: Sequence[AttentionSession], recompute: bool) -> None:
        H = call.num_heads
        self.mods = Mods()
        self.kernel = "auto"
        self.observers: list[tuple[AttentionSession, list[int]]] = []
        self.chunk_elements = sessions[0].chunk_elements if sessions else 1 << 21
        for session in sessions:
            if not recompute:
                session.sites_seen.add(call.site)  # every site that ran, touched or not
            if not session.active or not session.plan.touches(call.site):
                continue
            heads = session.plan.head_ids(call.site, H)
            if session.plan.mods:
                self.mods = self.mods + on_heads(session.plan.mods, heads, H, call.query.device)
                if session.kernel != "auto":
                    self.kernel = session.kernel
            if not recompute and session.observing:
                self.observers.append((session, heads))

    def announce(self, call: AttentionCall) -> None:
        """Show the live call to the taps that want it, before it runs."""
        for session, _ in self.observers:
            for tap in session.taps:
                if tap.wants_call:
                    tap.on_call(call)

    def compute(self, call: AttentionCall) -> Tensor:
        """The call's output (B, H, Q, Dv) from the chosen kernel."""
        return kernels.choose(call, self.mods, self.kernel).run(call, self.mods, self.chunk_elements)

    def observe(self, call: AttentionCall, out: Tensor | None) -> None:
        """Show the call to the observing sessions' taps (``out``: the output, if there is one)."""
        for session, heads in self.observers:
            chunk_taps = [t for t in session.taps if t.wants_chunks]
            if chunk_taps:
                rows, sampled = session.plan.rows(call.query_length, session.generator, call.query.device)
                observe_call(call, self.mods, chunk_taps, heads, rows, sampled, session.query_mask, session.chunk_elements)
            if out is not None:
                for tap in session.taps:
                    if tap.wants_output:
                        tap.on_output(call, out.detach())
        grad_taps = [t for s, _ in self.observers for t in s.taps if t.wants_grad_output]
        if grad_taps and out is not None and out.requires_grad:
            out.register_hook(_grad_hook(call, grad_taps))


def answer_alone(sessions: Sequence[AttentionSession], module: nn.Module, site: Site, query: Tensor, key: Tensor,
                 value: Tensor, mask: Tensor | None, scale: float) -> Tensor | None:
    """The output (B, H, Q, Dv) of a plain call, when the only session attached answers it on its
    own (``AttentionSession.answer_plain``); None: the call takes ``run_call``. The caller has
    checked that the call is plain (no bias, soft-cap, sinks or dropout) and no recompute."""
    if len(sessions) != 1:
        return None
    session = sessions[0]
    if not session.active or session.plan.heads is not None or not session.plan.touches(site):
        return None
    out = session.answer_plain(module, site, query, key, value, mask, scale)
    if out is not None:
        session.sites_seen.add(site)
    return out


@eager_under_compile  # attnkit's Python runs eagerly; torch.compile graph-breaks around it
def run_call(call: AttentionCall, sessions: Sequence[AttentionSession], recompute: bool = False) -> Tensor:
    """The output (B, H, Q, Dv) of ``call`` through ``sessions`` (outermost first)."""
    dispatch = Dispatch(call, sessions, recompute)
    dispatch.announce(call)
    out = dispatch.compute(call)
    dispatch.observe(call, out)
    return out


def _grad_hook(call: AttentionCall, taps: list[Tap]):
    def hook(grad: Tensor) -> None:
        for tap in taps:
            tap.on_grad_output(call, grad.detach())

    return hook


def in_backward() -> bool:
    """True while autograd runs a backward pass: a forward now is a checkpoint recompute."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class Attachment:
    """The sessions attached to one attention module (outermost first) and its model's sites."""

    sessions: list[AttentionSession]
    sites: SiteTable


_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Attachment]" = weakref.WeakKeyDictionary()


def attachment_of(module: nn.Module) -> Attachment | None:
    """The module's attachment, or None when no session is attached to it."""
    attachment = _ATTACHED.get(module)
    return attachment if attachment is not None and attachment.sessions else None
