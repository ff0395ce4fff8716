"""Hugging Face transformers adapter: an ``AttentionInterface`` function plus its mask function.

transformers (v5) looks the attention function up by ``config._attn_implementation``. attnkit
registers one under the name ``attnkit`` and, just as important, a mask function under the same
name in ``AttentionMaskInterface``: without it the custom name gets ``attention_mask=None`` and
causal models silently lose their causal mask. The mask function builds exactly the mask the
model's own implementation would have built (eager: float additive; SDPA: bool, or None where
SDPA's ``is_causal`` covers it), so code outside attention that reads the mask sees what it
always saw, and the model's own kernel (the ``native`` of each call) computes exactly what it
computed before ``attach``.
"""

from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnkit.seam.eager import eager_under_compile
from attnkit.seam.call import build_call
from attnkit.seam.session import answer_alone, attachment_of, in_backward, run_call

NAME = "attnkit"
# Implementations whose kernel and mask attnkit reproduces exactly; any other runs as SDPA.
_REPRODUCED = ("eager", "sdpa")
# id(config) -> (the config, weakly; the implementation it had before attach). Keyed by id because
# configs compare by value; the weak reference tells a live entry from one whose config has gone.
_ORIGINAL: dict[int, tuple[weakref.ref, str]] = {}
_SWITCHED: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()  # model -> [previous, count]
_registered = False


def _original_of(config) -> str:
    """The implementation ``config`` had before attach, if it is one attnkit reproduces; else SDPA."""
    ref, name = _ORIGINAL.get(id(config), (None, "sdpa"))
    name = name if ref is not None and ref() is config else "sdpa"
    return name if name in _REPRODUCED else "sdpa"


def _original(module: nn.Module) -> str:
    return _original_of(getattr(module, "config", None))


def _native_function(module: nn.Module) -> Callable:
    """The attention function the module would have called: its modeling file's own
    ``eager_attention_forward`` for eager models, transformers' SDPA otherwise."""
    if _original(module) == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@eager_under_compile  # attnkit's Python runs eagerly; torch.compile graph-breaks around it
def attnkit_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    attachment = attachment_of(module)
    recompute = in_backward()
    site = attachment.sites.site_of(module, count=not recompute) if attachment is not None else None
    if site is not None and not recompute and _plain(module, dropout, kwargs):
        # a call the one session attached computes on its own (a sparse decoding step)
        out = answer_alone(attachment.sessions, module, site, query, key, value, attention_mask,
                           scaling if scaling is not None else query.shape[-1] ** -0.5)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    function = _native_function(module)

    def native(scale: float) -> Tensor:  # (B, H, Q, D)
        return function(module, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs)[0].transpose(1, 2)

    if attachment is None:  # a model switched to "attnkit" outside a session behaves as before
        return native(scaling if scaling is not None else query.shape[-1] ** -0.5).transpose(1, 2), None
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    mask, is_causal = attention_mask, attention_mask is None and bool(causal)
    if mask is None and causal and 1 < query.shape[2] < key.shape[2]:
        # SDPA's is_causal puts the diagonal top-left: the keys past the queries (a preallocated
        # cache's unwritten slots, which transformers leaves unmasked in its prefill) are hidden;
        # the mask is causal itself
        mask, is_causal = _top_left_causal(query.shape[2], key.shape[2], query.device), False
    call = build_call(
        module, site, query, key, value,
        mask=mask,
        scale=scaling,
        # The rule transformers' SDPA path applies when no mask was built.
        is_causal=is_causal,
        dropout=dropout,
        softcap=kwargs.get("softcap"),
        # A relative position bias (T5, wav2vec2-conformer, Inkling) is added to the scores next
        # to the mask, as the models' own eager functions and transformers' SDPA path add it.
        bias=kwargs.get("position_bias"),
        sinks=_learned_sinks(kwargs),
        native=native,
    )
    out = run_call(call, attachment.sessions, recompute)
    return out.transpose(1, 2).contiguous(), None


_top_left: tuple[weakref.ref, int] | None = None  # _top_left_causal's last mask, its version


def _top_left_causal(Q: int, K: int, device: torch.device) -> Tensor:
    """(1, 1, Q, K) bool: query i sees keys 0..i. The last one made is reused, unchanged, while anything
    still holds it (a session keeping the call's mask): the layers of a forward then share one, as
    they share the mask a model makes, and what is derived from it is computed once."""
    global _top_left
    mask = _top_left[0]() if _top_left is not None else None
    if mask is None or mask._version != _top_left[1] or mask.shape != (1, 1, Q, K) or mask.device != device:
        mask = torch.ones(1, 1, Q, K, dtype=torch.bool, device=device).tril()
        _top_left = (weakref.ref(mask), mask._version)
    return mask


def _plain(module: nn.Module, dropout: float, kwargs: dict) -> bool:
    """Whether the call has nothing beyond its mask and scale: no soft-cap, position bias, sinks, or
    dropout in force."""
    return ((not dropout or not module.training) and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and _learned_sinks(kwargs) is None)


def _learned_sinks(kwargs: dict) -> Tensor | None:
    """The call's learned sink logits: one per head as ``s_aux`` (gpt-oss, granite-SWA, MiMo-V2),
    or one per head and query row as ``sinks`` (Inkling2, (B, H, Q, 1)). A sink joins each row's
    softmax denominator and has no value."""
    s_aux = kwargs.get("s_aux")
    return s_aux if s_aux is not None else kwargs.get("sinks")


def _mask_as_original(*args, config=None, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[_original_of(config)](*args, config=config, **kwargs)


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attnkit_attention)
    AttentionMaskInterface.register(NAME, _mask_as_original)
    _registered = True


def _models(root: nn.Module) -> list[nn.Module]:
    """The outermost transformers models inside ``root`` (itself, or wrapped by DDP, compile, ...)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    found: list[nn.Module] = []
    inside: set[int] = set()
    for m in root.modules():
        if id(m) in inside or not isinstance(m, PreTrainedModel):
            continue
        inside.update(id(sub) for sub in m.modules())
        if m._can_set_attn_implementation():
            found.append(m)
    return found


def _configs(model: nn.Module) -> list:
    """Every config (top level, sub-configs, sub-models') whose attention implementation may change."""
    from transformers import PreTrainedModel

    seen: dict[int, object] = {}
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            stack = [m.config]
            while stack:
                cfg = stack.pop()
                if id(cfg) in seen:
                    continue
                seen[id(cfg)] = cfg
                for key in getattr(cfg, "sub_configs", {}) or {}:
                    sub = getattr(cfg, key, None)
                    if sub is not None:
                        stack.append(sub)
    return list(seen.values())


_dispatches: dict[type, bool] = {}


def _dispatches_attention(module: nn.Module) -> bool:
    """Whether the module's forward calls transformers' attention interface (read from its source once per class)."""
    cls = type(module)
    if cls not in _dispatches:
        try:
            _dispatches[cls] = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _dispatches[cls] = False
    return _dispatches[cls]


def find(root: nn.Module) -> list[nn.Module]:
    found = []
    for model in _models(root):
        modules = [m for m in model.modules() if _dispatches_attention(m)]
        unreached = _unreached_attention(model)
        if modules and unreached:  # with no module at all, attach refuses the model outright
            warnings.warn(
                f"{type(model).__name__}: {', '.join(unreached)} compute attention without transformers' "
                "AttentionInterface: attnkit does not see those calls (the rest of the model is observed)",
                stacklevel=5,  # the caller's `with attach(...)` line
            )
        found.extend(modules)
    return found


def _unreached_attention(model: nn.Module) -> list[str]:
    """Class names of modules named like attention (``...Attention``, ``...Attn``) that neither
    dispatch nor hold a module that does (or an ``nn.MultiheadAttention``, or a protocol module):
    hand-written attention such as LongT5's local encoder, BigBird-Pegasus' encoder, GIT's text
    layers or SAM's vision encoder, which attnkit cannot see."""

    def reached(m: nn.Module) -> bool:
        return (_dispatches_attention(m) or isinstance(m, nn.MultiheadAttention)
                or bool(getattr(m, "is_attnkit_attention", False)))

    names = set()
    for m in model.modules():
        if type(m).__name__.lower().endswith(("attention", "attn")) and not any(reached(s) for s in m.modules()):
            names.add(type(m).__name__)
    return sorted(names)


def install(root: nn.Module, modules: list[nn.Module]) -> Callable[[], None]:
    """Switch every transformers model in ``root`` to attnkit's attention; the returned function
    switches back. Nested sessions share one switch: the last one out restores."""
    register()
    # weak references: an attachment never closed must not keep the model alive through its undo
    switched: list[weakref.ref] = []

    def restore() -> None:
        for model in filter(None, (r() for r in switched)):
            entry = _SWITCHED.get(model)
            if entry is None:  # already undone
                continue
            entry[1] -= 1
            if entry[1] == 0:
                for cfg, value in entry[0]:
                    cfg._attn_implementation_internal = value
                    _ORIGINAL.pop(id(cfg), None)
                del _SWITCHED[model]
        switched.clear()

    for key in [key for key, (ref, _) in _ORIGINAL.items() if ref() is None]:
        del _ORIGINAL[key]  # left by a model that died attached
    try:
        for model in _models(root):
            if model in _SWITCHED:
                _SWITCHED[model][1] += 1
                switched.append(weakref.ref(model))
                continue
            configs = _configs(model)
            previous = [(cfg, cfg.__dict__.get("_attn_implementation_internal")) for cfg in configs]
            for cfg in configs:
                _ORIGINAL[id(cfg)] = (weakref.ref(cfg), cfg._attn_implementation)
            _SWITCHED[model] = [previous, 1]
            switched.append(weakref.ref(model))
            model.set_attn_implementation(NAME)
    except BaseException:
        restore()
        raise
    return restore
