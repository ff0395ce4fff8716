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
per-element evaluation on a sample of elements. Otherwise the modifier runs element by element
under ``torch.vmap`` over the flattened scores, in chunks of ``VMAP_CHUNK`` elements so memory
stays bounded, with autograd through it. The decision is cached per modifier and grid shape.

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

if TYPE_CHECKING:
    from attnkit.seam.plan import Mods

VMAP_CHUNK = 1 << 16  # elements per vmapped call: a few MiB per intermediate
SAMPLE = 64  # elements on which a broadcast result is checked against the per-element one

BROADCAST, ELEMENTWISE = "broadcast", "elementwise"
_decisions: "weakref.WeakKeyDictionary[Callable, dict[tuple, str]]" = weakref.WeakKeyDictionary()


class ModifierError(ValueError):
    """A modifier that evaluates neither on index grids nor element by element."""


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


def apply_mods(mods: Mods, scores: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> tuple[Tensor, Tensor | None]:
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
    cached = _cached(mod).get(signature)
    if cached == ELEMENTWISE:
        return elementwise(mod, args, shape)
    try:
        out = mod(*args)
        problem = _shape_problem(out, shape)
    except (IndexError, RuntimeError, TypeError, ValueError) as exc:
        out, problem = None, _one_line(exc)
    if problem is None and cached == BROADCAST:
        return out if kind == "mask" or out.shape == shape else out.expand(shape)
    if problem is None and _agrees(mod, args, shape, out, kind):
        _remember(mod, signature, BROADCAST)
        return out if kind == "mask" or out.shape == shape else out.expand(shape)
    try:
        result = elementwise(mod, args, shape)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's function: say both
        name = getattr(mod, "__name__", type(mod).__name__)
        why = problem or "its broadcast result differs from the per-element one"
        raise ModifierError(
            f"the {kind} modifier {name!r} cannot be evaluated: on broadcast index grids ({why}); "
            f"element by element, as FlexAttention's eager path does ({_one_line(exc)})"
        ) from exc
    _remember(mod, signature, ELEMENTWISE)
    return result


def elementwise(mod: Callable, args: tuple[Tensor, ...], shape: torch.Size) -> Tensor:
    """``mod`` vmapped over every element of ``shape`` (FlexAttention's eager semantics), in chunks.

    args: tensors broadcastable to ``shape`` (the score and the index grids); each chunk gathers
    its elements from the broadcast views, so nothing of ``shape``'s size is built but the result.
    """
    total = math.prod(shape)
    if total == 0:
        return torch.empty(shape, dtype=args[0].dtype if args[0].is_floating_point() else torch.bool, device=args[0].device)
    views = [a.expand(shape) for a in args]
    vmapped = torch.vmap(mod)
    pieces = []
    for start in range(0, total, VMAP_CHUNK):
        flat = torch.arange(start, min(start + VMAP_CHUNK, total), device=args[0].device)
        coords = torch.unravel_index(flat, shape)
        pieces.append(vmapped(*(v[coords] for v in views)))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return out.view(shape)


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
    """Whether the broadcast result equals the per-element one on a sample of elements (spread
    over the whole block: first, last and evenly between). A modifier that vmap cannot run is
    taken as it is: the broadcast call is the only evaluation there is."""
    total = math.prod(shape)
    if total == 0:
        return True
    flat = torch.linspace(0, total - 1, min(SAMPLE, total), device=out.device).round().long()
    coords = torch.unravel_index(flat, shape)
    with torch.no_grad():
        try:
            expected = torch.vmap(mod)(*(a.detach().expand(shape)[coords] for a in args))
        except Exception:  # noqa: BLE001 - e.g. data-dependent control flow: vmap cannot tell
            return True
        got = out.detach().expand(shape)[coords]
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
