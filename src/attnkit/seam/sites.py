"""Which attention a call belongs to: a ``Site`` per attention module (and per repeated call).

A decoder-only model has one stack of self-attention layers numbered by the model itself
(``module.layer_idx``). An encoder–decoder has three (encoder self, decoder self, decoder
cross) that all number from 0; ALBERT calls one module for every layer; SigLIP adds an
``nn.MultiheadAttention`` pooling head beside its HF layers. ``SiteTable`` gives every call a
``Site`` that is unique in one forward and keeps ``layer`` in the model's own numbering.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from torch import nn


class Site(NamedTuple):
    """One attention of a model. ``layer`` is the model's own layer number."""

    layer: int
    stack: str = ""  # "" for a model with one stack; else e.g. "encoder", "decoder", "vision";
    #                  a layer's second call within one forward adds " pass 2" ("pass 2" alone)
    kind: str = "self"  # "self" or "cross"

    def __str__(self) -> str:
        words = [w for w in (self.stack, "cross-attention" if self.kind == "cross" else "") if w]
        return " ".join([*words, f"layer {self.layer}"])


_CONTAINER = re.compile(r"^(layers?|h|blocks?|block|encoder_layers|decoder_layers|\d+)$")
_CROSS_NAMES = ("crossattention", "cross_attn", "cross_attention", "encoder_attn", "encdecattention")


def stack_of(path: str) -> str:
    """The stack a module path lies in: its path up to the layer container, e.g.
    ``model.encoder.layers.3.self_attn`` -> ``model.encoder``."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if _CONTAINER.match(part) and i + 1 < len(parts) and parts[i + 1].isdigit():
            return ".".join(parts[:i])
        if part.isdigit():
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def place_in_layer(path: str, stack_path: str) -> tuple[int | None, str]:
    """(layer number, path inside the layer) of a module path below ``stack_path``:
    ``layers.1.attention_input`` -> (1, "attention_input"); (None, path) without a layer number."""
    rest = path[len(stack_path) + 1:] if stack_path else path
    parts = rest.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(p for p in parts[i + 1:] if not p.isdigit())
    return None, rest


def is_cross_attention(path: str, module: nn.Module) -> bool:
    if getattr(module, "is_cross_attention", False):
        return True
    lowered = path.lower()
    return any(name in lowered for name in _CROSS_NAMES)


def _short_stacks(stacks: list[str], keep_names: bool = False) -> dict[str, str]:
    """Full stack paths -> short names: "" when there is one stack (unless ``keep_names``: an
    encoder–decoder whose encoder does not dispatch still says "decoder"), else the last path
    part that tells them apart (``model.encoder`` / ``model.decoder`` -> ``encoder`` / ``decoder``)."""
    unique = sorted(set(stacks))
    if len(unique) <= 1 and not keep_names:
        return {s: "" for s in unique}
    short = {s: (s.split(".")[-1] if s else "model") for s in unique}
    if len(set(short.values())) < len(unique):  # last parts collide: keep the full paths
        short = {s: (s or "model") for s in unique}
    return short


class SiteTable:
    """Sites of one model's attention modules, shared by every session attached to it.

    Modules with an int ``layer_idx`` keep it. Modules without one, or whose ``layer_idx``
    collides inside their (stack, kind), are numbered by the order of their calls in the
    forward (reset by ``start_forward``), which also numbers a module called once per layer
    (ALBERT) as that many layers. Modules without a ``layer_idx`` inside layers whose attention
    has one (Inkling2's attention over depth, ``layers.1.attention_input``) form a stack of their
    own, named by their place in the layer, with the layer number of their path.

    A module with a ``layer_idx`` called again within one forward of the model (HRM's and Dory's
    recurrence loops, a wrapper running the model twice) gets a site per pass: the second call of
    layer 3 is ``Site(3, "pass 2")`` (``"decoder pass 2"`` in a named stack). Only calls inside the
    model's own forward count (between ``start_forward`` and ``end_forward``): a sub-module called
    on its own (``model.get_encoder()(...)``) keeps its plain site.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module]) -> None:
        path_of = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        paths = [path_of.get(id(m), type(m).__name__) for m in modules]
        stacks = [stack_of(p) for p in paths]
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        short = _short_stacks(stacks, keep_names=encoder_decoder)
        self._base: dict[int, tuple[int | None, str, str]] = {}
        groups: dict[tuple[str, str], list[tuple[nn.Module, int | None, str, str]]] = {}
        for m, p, s in zip(modules, paths, stacks):
            kind = "cross" if is_cross_attention(p, m) else "self"
            idx = getattr(m, "layer_idx", None)
            groups.setdefault((short[s], kind), []).append((m, idx if isinstance(idx, int) else None, p, s))
        for (stack, kind), members in list(groups.items()):
            numbered = [idx for _, idx, _, _ in members if idx is not None]
            if numbered and len(numbered) < len(members) and len(set(numbered)) == len(numbered):
                groups[(stack, kind)] = [member for member in members if member[1] is not None]
                for m, _, p, s in (member for member in members if member[1] is None):
                    layer, inside = place_in_layer(p, s)
                    sub = f"{stack}.{inside}" if stack else inside
                    groups.setdefault((sub, kind), []).append((m, layer, p, s))
        for (stack, kind), members in groups.items():
            indices = [idx for _, idx, _, _ in members]
            trusted = None not in indices and len(set(indices)) == len(indices)
            for m, idx, _, _ in members:
                self._base[id(m)] = (idx if trusted else None, stack, kind)
        self._calls: dict[tuple[str, str], int] = {}
        self._passes: dict[int, int] = {}  # id(module) -> calls so far in this forward
        self._in_forward = False
        self._last: dict[int, Site] = {}

    def start_forward(self) -> None:
        self._calls, self._passes, self._in_forward = {}, {}, True

    def end_forward(self) -> None:
        self._in_forward = False

    def site_of(self, module: nn.Module, count: bool = True) -> Site:
        """The site of this call of ``module``. ``count=False`` (a gradient-checkpoint recompute)
        answers the site of the module's last call without advancing the call order."""
        layer, stack, kind = self._base.get(id(module), (None, "", "self"))
        if layer is not None:
            if not count:
                return self._last.get(id(module), Site(layer, stack, kind))
            passes = self._passes.get(id(module), 0) if self._in_forward else 0
            if self._in_forward:
                self._passes[id(module)] = passes + 1
            site = Site(layer, f"{stack} pass {passes + 1}".strip() if passes else stack, kind)
            self._last[id(module)] = site
            return site
        if not count:
            return self._last.get(id(module), Site(0, stack, kind))
        n = self._calls.get((stack, kind), 0)
        self._calls[(stack, kind)] = n + 1
        site = self._last[id(module)] = Site(n, stack, kind)
        return site


class SiteDict(dict):
    """A dict keyed by ``Site`` in which a plain int ``n`` means ``Site(n)``, the self-attention
    layer n of a single-stack model: ``capture.maps[0]`` on GPT-2, ``maps[Site(0, "decoder",
    "cross")]`` on BART."""

    @staticmethod
    def _site(key):
        return Site(key) if isinstance(key, int) and not isinstance(key, Site) else key

    def __getitem__(self, key):
        return super().__getitem__(self._site(key))

    def __contains__(self, key) -> bool:
        return super().__contains__(self._site(key))

    def get(self, key, default=None):
        return super().get(self._site(key), default)
