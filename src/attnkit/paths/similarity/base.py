"""The registry of similarity functions (``SIMILARITIES``, ``register_similarity``) and what they share (``upcast``)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from attnkit.errors import UserError

SIMILARITIES: dict[str, type[nn.Module]] = {}


def upcast(p: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (products of small probabilities underflow there); float64 stays."""
    return p if p.dtype in (torch.float32, torch.float64) else p.float()


def register_similarity(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``name`` available to :func:`make_similarity` and the decoder."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in SIMILARITIES and SIMILARITIES[name] is not cls:
            raise ValueError(f"similarity {name!r} is already registered ({SIMILARITIES[name].__name__})")
        SIMILARITIES[name] = cls
        cls.name = name
        return cls

    return add


def list_similarities() -> list[str]:
    return list(SIMILARITIES)


def make_similarity(name: str | nn.Module, **kwargs) -> nn.Module:
    """The similarity registered as ``name`` (a module is returned as it is).

    Learnable variants need ``vocab_size`` (and take ``embedding``: the model's input embedding
    matrix ``(V, d)`` as a frozen basis, so their parameters scale with d, not V).
    """
    if isinstance(name, nn.Module):
        return name
    if name not in SIMILARITIES:
        raise UserError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}")
    try:
        return SIMILARITIES[name](**kwargs)
    except TypeError as e:
        raise UserError(f"similarity {name!r}: {e}") from e
