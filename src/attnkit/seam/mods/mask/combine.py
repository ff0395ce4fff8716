"""Combine mask modifiers: ``and_masks(a, b)`` sees a key when both do, ``or_masks`` when either does.

    near_but_not_self = and_masks(local_window(3), lambda b, h, q, kv: q != kv)
"""

from __future__ import annotations

from torch import Tensor


def and_masks(*masks):
    if not masks:
        raise ValueError("and_masks needs at least one mask")

    def all_of(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    return all_of


def or_masks(*masks):
    if not masks:
        raise ValueError("or_masks needs at least one mask")

    def any_of(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    return any_of
