"""Score and mask modifiers evaluated the way FlexAttention defines them: one element at a time.

A modifier is written for one score: ``score_mod(score, b, h, q_idx, kv_idx)`` and
``mask_mod(b, h, q_idx, kv_idx)`` receive 0-d tensors. FlexAttention compiles it into its kernel
or, in eager mode, ``torch.vmap``s it over every element. attnkit's kernels evaluate a block of
scores at once, and the fast way is one call on broadcast index grids (b: (B, 1, 1, 1),
h: (1, H, 1, 1), ...). That call equals the per-element one for modifiers built from elementwise
operations and single indexing (``bias[h, q_idx]``); it fails or differs for the rest: chained or
data-dependent indexing of captured tensors (``bias[b][h][q_idx]``, ``table[b][q_idx]``),
reductions over the score, results of another shape.

So each modifier is tried once per grid shape on the broadcast grids; that call is kept when it
succeeds, its result has the shape of the scores (broadcasting to them), and it agrees with the
per-element evaluation on a sub-grid of elements. Otherwise the modifier runs element by element
as FlexAttention's eager path runs it: nested ``torch.vmap``s, one per dimension, in slices of
``ELEMENT_CHUNK`` elements so memory stays bounded, with autograd through it. The decision is
cached per modifier and grid shape.

``apply_mods`` runs a call's modifiers in order and also returns which keys stay visible: those
every mask modifier keeps and no score modifier sent to -inf (FlexAttention treats such a key
as masked; a row left with no visible key is empty: zero output and zero gradient).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit.errors import UserError

if TYPE_CHECKING:
    from attnkit.seam.plan import Mods

ELEMENT_CHUNK = 1 << 22  # elements per vmapped call at most: 16 MiB per float32 intermediate

BROADCAST, ELEMENTWISE = "broadcast", "elementwise"
_decisions: "weakref.WeakKeyDictionary[Callable, dict[tuple, str]]" = weakref.WeakKeyDictionary()


class ModifierError(UserError, ValueError):
    """A modifier that evaluates neither on index grids nor element by element (e.g. Python
    control flow on an index: FlexAttention refuses it as well)."""


def evaluate_score_mod(mod: Callable, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """``mod(score, b, h, q_idx, kv_idx)`` for every element of ``score``, as FlexAttention defines it.

    score: (..., K) scores; b, h, q_idx, kv_idx: integer index grids broadcastable to its shape.
    Returns a tensor of ``score``'s shape.
    """
    return _evaluate(mod, (score, b, h, q_idx, kv_idx), score.shape, "score")


def evaluate_mask_mod(mod: Callable, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """``mod(b, h, q_idx, kv_idx)`` for every element of the grids, as a bool tensor broadcastable
    to their broadcast shape (the broadcast call's own result where that is exact)."""
    shape = torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)
    return _evaluate(mod, (b, h, q_idx, kv_idx), shape, "mask").bool()


def apply_mods(
    mods: Mods, scores: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """Every score modifier of ``mods`` on ``scores`` (in order), then every mask modifier.

    Returns (scores, keep): keep is bool, broadcastable to ``scores``: the keys every mask
    modifier keeps and no score modifier sent to -inf (a -inf already in ``scores`` is the
    model's own and stays visible: an overflow is a finding, not a mask); None = every key.
    """
    keep = None
    if mods.score:
        before = scores
        for mod in mods.score:
            scores = evaluate_score_mod(mod, scores, b, h, q_idx, kv_idx)
        low = scores.detach().amin() if scores.numel() else scores.new_zeros(())
        if not bool(low > -math.inf):  # a -inf (or a NaN, which hides whether there is one): look
            sent = torch.isneginf(scores)
            if bool(sent.any()):
                keep = ~(sent & ~torch.isneginf(before))
    for mod in mods.mask:
        extra = evaluate_mask_mod(mod, b, h, q_idx, kv_idx)
        keep = extra if keep is None else keep & extra
    return scores, keep


# --------------------------------------------------------------------------- the two ways
def _evaluate(mod: Callable, args: tuple[Tensor, ...], shape: torch.Size, kind: str) -> Tensor:
    signature = (kind, tuple(a.shape for a in args), args[0].dtype, args[0].device.type)
    decision = _cached(mod).get(signature)
    if decision == BROADCAST:
        return _broadcast(mod, args, shape, kind)
    if decision == ELEMENTWISE:
        return elementwise(mod, args, shape)
    # Deciding: the trial call records no autograd graph, so that a forward that decides saves
    # exactly what a checkpoint's recompute (which finds the decision cached) saves.
    graph = torch.is_grad_enabled() and any(a.requires_grad for a in args)
    raised: Exception | None = None
    with torch.no_grad():
        try:
            out = mod(*args)
            problem = _shape_problem(out, shape)
        except (IndexError, RuntimeError, TypeError, ValueError) as exc:
            out, problem, raised = None, _one_line(exc), exc
        exact = problem is None and _agrees(mod, args, shape, out, kind)
    if exact:
        _remember(mod, signature, BROADCAST)
        return _broadcast(mod, args, shape, kind) if graph else _fit(out, shape, kind)
    try:
        result = elementwise(mod, args, shape)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's function: say both
        if raised is not None and type(exc) is type(raised) and str(exc) == str(raised):
            raise  # the modifier's own error, whichever way it is called: its message says it all
        name = getattr(mod, "__name__", type(mod).__name__)
        why = problem or "its broadcast result differs from the per-element one"
        raise ModifierError(
            f"the {kind} modifier {name!r} cannot be evaluated: on broadcast index grids ({why}); "
            f"element by element, as FlexAttention's eager path does ({_one_line(exc)})"
        ) from exc
    _remember(mod, signature, ELEMENTWISE)
    return result


def _broadcast(mod: Callable, args: tuple[Tensor, ...], shape: torch.Size, kind: str) -> Tensor:
    return _fit(mod(*args), shape, kind)


def _fit(out: Tensor, shape: torch.Size, kind: str) -> Tensor:
    """A mask as the modifier gave it (it broadcasts); scores at the scores' full shape."""
    return out if kind == "mask" or out.shape == shape else out.expand(shape)


def elementwise(mod: Callable, args: tuple[Tensor, ...], shape: torch.Size) -> Tensor:
    """``mod`` evaluated per element of ``shape`` (FlexAttention's eager semantics), in slices.

    args: tensors broadcastable to ``shape`` (the score and the index grids). As FlexAttention
    does, one ``torch.vmap`` per dimension, each argument batched only over the dimensions it
    varies along: ``bias[b]`` is then B slices of ``bias``, not one per element. Slices of about
    ``ELEMENT_CHUNK`` elements along the largest dimension bound the memory of a call.
    """
    args = tuple(a.reshape((1,) * (len(shape) - a.dim()) + tuple(a.shape)) for a in args)
    total = math.prod(shape)
    if total == 0:
        dtype = args[0].dtype if args[0].is_floating_point() else torch.bool  # scores, or a mask
        return torch.empty(shape, dtype=dtype, device=args[0].device)
    dim = max(range(len(shape)), key=lambda d: shape[d])
    step = max(1, ELEMENT_CHUNK * shape[dim] // total)
    if step >= shape[dim]:
        return _nested_vmap(mod, args, shape)
    pieces = []
    for start in range(0, shape[dim], step):
        part = tuple(a if a.shape[dim] == 1 else a.narrow(dim, start, min(step, shape[dim] - start)) for a in args)
        sub = list(shape)
        sub[dim] = min(step, shape[dim] - start)
        pieces.append(_nested_vmap(mod, part, torch.Size(sub)))
    return torch.cat(pieces, dim)


def _nested_vmap(mod: Callable, args: tuple[Tensor, ...], shape: torch.Size) -> Tensor:
    """(``shape``) ``mod`` on 0-d elements: a vmap for each dimension some argument varies along
    (outermost first), the arguments' size-1 dimensions dropped so that each level maps dim 0."""
    levels = [d for d in range(len(shape)) if shape[d] > 1]
    squeezed = tuple(a.reshape([a.shape[d] for d in levels if a.shape[d] > 1]) for a in args)
    fn = mod
    for d in reversed(levels):  # the innermost vmap maps the last dimension
        fn = torch.vmap(fn, in_dims=tuple(0 if a.shape[d] > 1 else None for a in args))
    out = fn(*squeezed)  # (shape[levels])
    return out.reshape(shape)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _shape_problem(out: object, shape: torch.Size) -> str | None:
    if not isinstance(out, Tensor):
        return f"it returned {type(out).__name__}, not a tensor"
    if out.dim() != len(shape):
        return f"its result has shape {tuple(out.shape)}, not one broadcastable to {tuple(shape)}"
    try:
        if torch.broadcast_shapes(out.shape, shape) != shape:
            return f"its result has shape {tuple(out.shape)}, larger than {tuple(shape)}"
    except RuntimeError:
        return f"its result has shape {tuple(out.shape)}, not one broadcastable to {tuple(shape)}"
    return None


def _agrees(mod: Callable, args: tuple[Tensor, ...], shape: torch.Size, out: Tensor, kind: str) -> bool:
    """Whether the broadcast result equals the per-element one on a sub-grid: along each
    dimension its first, last and middle index (at most 3^n elements). A modifier that vmap
    cannot run is taken as it is: the broadcast call is the only evaluation there is."""
    if math.prod(shape) == 0:
        return True
    picks = [torch.tensor(sorted({0, (n - 1) // 2, n - 1}), device=out.device) for n in shape]

    def sub(t: Tensor) -> Tensor:
        t = t.detach().reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
        for d, idx in enumerate(picks):
            if t.shape[d] > 1:
                t = t.index_select(d, idx)
        return t

    small = torch.Size(len(p) for p in picks)
    with torch.no_grad():
        try:
            expected = _nested_vmap(mod, tuple(sub(a) for a in args), small)
        except Exception:  # noqa: BLE001 - e.g. data-dependent control flow: vmap cannot tell
            return True
        got = sub(out).expand(small)
        if kind == "mask":
            return bool(torch.equal(got.bool(), expected.bool()))
        return bool(torch.allclose(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6, equal_nan=True))


def _cached(mod: Callable) -> dict[tuple, str]:
    try:
        return _decisions.get(mod, {})
    except TypeError:  # not weak-referenceable: no cache
        return {}


def _remember(mod: Callable, signature: tuple, decision: str) -> None:
    try:
        _decisions.setdefault(mod, {})[signature] = decision
    except TypeError:
        pass
