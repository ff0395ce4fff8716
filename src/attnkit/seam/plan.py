"""The plan of a session: which sites, heads, rows and forwards it touches, and which mods apply.

A plan is data: the session asks it, per call, whether the call is touched, which heads are
observed and modified, and which query rows the taps get. ``Mods`` is what a kernel receives:
the score and mask modifiers of every session on the call, already confined to their heads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit.seam.sites import Site


@dataclass(frozen=True)
class Mods:
    """Score and mask modifiers for one call, in the order they apply (FlexAttention signatures)."""

    score: tuple = ()
    mask: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.score or self.mask)

    def __add__(self, other: "Mods") -> "Mods":
        return Mods(self.score + other.score, self.mask + other.mask)

    @property
    def scale_factor(self) -> float | None:
        """When every modifier is a pure rescaling of the logits (a temperature), the factor a
        kernel can fold into the softmax scale; None otherwise."""
        if self.mask:
            return None
        factor = 1.0
        for mod in self.score:
            f = getattr(mod, "scale_factor", None)
            if f is None:
                return None
            factor *= f
        return factor


def on_heads(mods: Mods, heads: Sequence[int], num_heads: int, device: torch.device) -> Mods:
    """``mods`` acting only on ``heads``; every other head keeps its own scores and mask."""
    if not mods or list(heads) == list(range(num_heads)):
        return mods
    chosen = torch.zeros(num_heads, dtype=torch.bool, device=device)
    chosen[list(heads)] = True

    def only_on_heads_score(mod):
        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return torch.where(chosen[h], mod(score, b, h, q_idx, kv_idx), score)
        return score_mod

    def only_on_heads_mask(mod):
        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return mod(b, h, q_idx, kv_idx) | ~chosen[h]
        return mask_mod

    return Mods(tuple(only_on_heads_score(m) for m in mods.score), tuple(only_on_heads_mask(m) for m in mods.mask))


@dataclass
class Plan:
    """What a session touches.

    layers: layer numbers (every stack of that number) or ``Site``s; None = all.
    heads: observed and modified heads: a list for every selected layer, or {layer: [heads]}.
    sample_rows: taps see this many random query rows per call (the output uses all rows).
    every: observe one forward in ``every`` (1 = each); unobserved forwards cost a dict lookup.
    score_mods / mask_mods: applied to the selected layers and heads.
    """

    layers: set | None = None
    heads: Sequence[int] | dict[int, Sequence[int]] | None = None
    sample_rows: int | None = None
    every: int = 1
    mods: Mods = field(default_factory=Mods)

    @classmethod
    def build(
        cls,
        layers: Iterable[int | Site] | None = None,
        heads: Sequence[int] | dict[int, Sequence[int]] | None = None,
        sample_rows: int | None = None,
        every: int = 1,
        score_mods: Sequence = (),
        mask_mods: Sequence = (),
    ) -> "Plan":
        if every < 1:
            raise ValueError("every must be >= 1")
        if sample_rows is not None and sample_rows < 1:
            raise ValueError("sample_rows must be >= 1")
        chosen = None if layers is None else {x if isinstance(x, Site) else int(x) for x in layers}
        return cls(chosen, heads, sample_rows, every, Mods(tuple(score_mods), tuple(mask_mods)))

    def touches(self, site: Site) -> bool:
        return self.layers is None or site.layer in self.layers or site in self.layers

    def head_ids(self, site: Site, num_heads: int) -> list[int]:
        if self.heads is None:
            return list(range(num_heads))
        chosen = self.heads.get(site.layer, range(num_heads)) if isinstance(self.heads, dict) else self.heads
        bad = [h for h in chosen if not 0 <= h < num_heads]
        if bad:
            raise ValueError(f"{site} has {num_heads} heads; no head {bad[0]}")
        return list(chosen)

    def rows(self, query_length: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, bool]:
        """The query rows taps see, and whether they are a random sample."""
        if self.sample_rows is None or query_length <= self.sample_rows:
            return torch.arange(query_length, device=device), False
        picked = torch.randperm(query_length, generator=generator)[: self.sample_rows].sort().values
        return picked.to(device), True


def observed_forward(forward_index: int, every: int) -> bool:
    """Forwards 0, every, 2·every, ... are observed."""
    return forward_index % every == 0 if every > 1 else True

