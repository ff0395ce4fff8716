"""Adapter for any module that calls ``torch.nn.functional.scaled_dot_product_attention``.

nanoGPT, timm's ViTs, torchtitan's Llama, lit-gpt and most research code compute attention with
one call to ``F.scaled_dot_product_attention``. attnkit reaches those calls without an edit to
the model: while an attention module's forward runs, a ``TorchFunctionMode`` sees every torch
function it calls, and routes each SDPA call through the seam.

- **Which modules** (``find``): those whose class (its methods, and the module-level functions
  they call, a few levels deep) calls SDPA, read from the compiled code once per class; a class
  without parameters (torchtitan's ``ScaledDotProductAttention`` wrapper) stands for the nearest
  enclosing module that has parameters, so each call belongs to the module that owns its
  projections. Classes of torch, transformers and attnkit are left to their own adapters.
- **When** (``install``): each of those modules gets an instance ``forward`` (deleted again on
  restore, as the MultiheadAttention adapter does) that pushes a frame on a per-thread module
  stack, runs the module's own forward and pops the frame; the mode is on while the stack is not
  empty. It is therefore also on during a gradient-checkpoint recompute of the module, so the
  recompute gets the same modifiers, and it runs outside dynamo (a compiled model graph-breaks
  around the attention module). Modules another adapter owns (``nn.MultiheadAttention``, whose
  class forward calls SDPA itself; a transformers attention module; a protocol module) push a
  "foreign" frame from a forward hook: SDPA calls inside them are theirs, not counted twice.
- **The call**: SDPA's arguments become an ``AttentionCall`` (``build_call``): a bool or additive
  ``attn_mask``, ``is_causal`` (SDPA's causal mask is aligned to the top left when there are
  fewer queries than keys: built explicitly then), ``scale``, ``enable_gqa``, ``dropout_p``. The
  native kernel is the very same SDPA call, so a session that changes nothing gives bit-identical
  outputs and gradients.
- **Hand-written attention** (``att = softmax(q @ k^T * scale)``, nanoGPT's non-flash path) is not
  reachable. A model that has only that is refused at ``attach`` with the line that computes the
  softmax and the one-line change (``unreachable_hint``); a module that mentions SDPA but takes a
  hand-written path at run time is caught in its first forward: the mode follows tensors made by a
  matmul to a softmax over their last dimension, and the forward raises ``NoAttentionError`` (no
  call reached the seam) or warns (some did).
"""

from __future__ import annotations

import dis
import functools
import linecache
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from attnkit.errors import NoAttentionError
from attnkit.seam.adapters import hf, mha, protocol
from attnkit.seam.call import build_call
from attnkit.seam.session import attachment_of, in_backward, run_call

_SDPA = F.scaled_dot_product_attention
# the adapters listed before this one in ADAPTERS: modules they reach keep their SDPA calls to them
OTHER_ADAPTERS = (hf, mha, protocol)
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
# Classes from these packages reach the seam through their own adapter (or are not attention).
_LIBRARY_PACKAGES = ("torch", "transformers", "attnkit")
_MATMUL_NAMES = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "einsum"})
_SOFTMAX_NAMES = frozenset({"softmax", "_softmax"})
_HELPER_DEPTH = 3  # module-level functions followed from a method, to find an SDPA call in a helper


# --------------------------------------------------------------------------- which modules
def _is_library_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] in _LIBRARY_PACKAGES or cls is object


def _code_objects(function) -> list[types.CodeType]:
    """The code of a function and of everything compiled inside it (closures, comprehensions)."""
    code = getattr(function, "__code__", None)
    if code is None:
        return []
    found, todo = [], [code]
    while todo:
        c = todo.pop()
        found.append(c)
        todo.extend(const for const in c.co_consts if isinstance(const, types.CodeType))
    return found


def _functions_of_class(cls: type) -> list:
    functions = []
    for value in vars(cls).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, types.FunctionType):
            functions.append(value)
    return functions


def _is_user_function(value) -> bool:
    return isinstance(value, types.FunctionType) and value.__module__.split(".")[0] not in _LIBRARY_PACKAGES


def _calls_sdpa(function, depth: int = _HELPER_DEPTH, seen: set | None = None) -> bool:
    """Whether ``function`` names SDPA (``F.scaled_dot_product_attention``, an imported alias of
    it) or calls a function of user code that does: a module-level one (``attention(q, k, v)``)
    or one of another user module it imported (``ops.attention(q, k, v)``)."""
    seen = set() if seen is None else seen
    if id(function) in seen:
        return False
    seen.add(id(function))
    namespace = getattr(function, "__globals__", {})
    for code in _code_objects(function):
        # user modules this code names (``ops`` in ``ops.attention``): their functions are helpers too
        user_modules = [v for v in (namespace.get(n) for n in code.co_names)
                        if isinstance(v, types.ModuleType) and v.__name__.split(".")[0] not in _LIBRARY_PACKAGES]
        for name in code.co_names:
            if name == "scaled_dot_product_attention":
                return True
            target = namespace.get(name)
            if target is _SDPA:
                return True
            if depth == 0:
                continue
            helpers = [target] + [getattr(m, name, None) for m in user_modules]
            if any(_is_user_function(h) and _calls_sdpa(h, depth - 1, seen) for h in helpers):
                return True
    return False


_class_calls_sdpa_cache: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()


def class_calls_sdpa(cls: type) -> bool:
    """Whether a user class (or a user base class of it) calls SDPA in one of its methods."""
    if cls not in _class_calls_sdpa_cache:
        _class_calls_sdpa_cache[cls] = any(
            _calls_sdpa(f) for klass in cls.__mro__ if not _is_library_class(klass) for f in _functions_of_class(klass)
        )
    return _class_calls_sdpa_cache[cls]


def _foreign_modules(root: nn.Module) -> list[nn.Module]:
    """Attention modules another adapter owns (their SDPA calls are theirs)."""
    found: list[nn.Module] = []
    with warnings.catch_warnings():  # their own find warns when attach runs it; once is enough
        warnings.simplefilter("ignore")
        for adapter in OTHER_ADAPTERS:
            found.extend(adapter.find(root))
    return found


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def find(root: nn.Module) -> list[nn.Module]:
    """The attention modules of ``root`` whose SDPA calls this adapter routes, in module order."""
    foreign = {id(m) for m in _foreign_modules(root)}
    owned_by_others: set[int] = set()  # modules inside a foreign module: left to that adapter
    for m in root.modules():
        if id(m) in foreign:
            owned_by_others.update(id(sub) for sub in m.modules())
    chosen: set[int] = set()
    ancestors: list[tuple[str, nn.Module]] = []  # (path, module) from the root to the current module
    for path, m in root.named_modules():
        while ancestors and not (path.startswith(ancestors[-1][0] + ".") or ancestors[-1][0] == ""):
            ancestors.pop()
        ancestors.append((path, m))
        if id(m) in owned_by_others or _is_library_class(type(m)) or not class_calls_sdpa(type(m)):
            continue
        # the nearest enclosing module with parameters (the module itself when it has them)
        owner = next((a for _, a in reversed(ancestors) if _has_parameters(a)), m)
        chosen.add(id(owner))
    return [m for m in root.modules() if id(m) in chosen]


# --------------------------------------------------------------------------- hand-written attention
@dataclass
class HandWritten:
    """Where a module computes softmax attention by hand: ``file:line`` and the line's text."""

    path: str
    cls: str
    where: str
    line: str
    flag_off: str | None = None  # nanoGPT's ``self.flash = False`` (timm: ``fused_attn``): the SDPA path is there, switched off


def _softmax_over_matmul(function) -> tuple[str, str] | None:
    """(file:line, text) of the softmax in a function that also multiplies matrices, or None."""
    softmax_at = None
    matmul = False
    for code in _code_objects(function):
        for ins in dis.get_instructions(code):
            if ins.opname == "BINARY_OP" and ins.argrepr in ("@", "@="):
                matmul = True
            elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL", "LOAD_NAME") and isinstance(ins.argval, str):
                if ins.argval in _MATMUL_NAMES:
                    matmul = True
                elif ins.argval in _SOFTMAX_NAMES and softmax_at is None:
                    lineno = ins.positions.lineno if ins.positions else None
                    if lineno is not None:
                        softmax_at = (code.co_filename, lineno)
    if softmax_at is None or not matmul:
        return None
    filename, lineno = softmax_at
    return f"{filename}:{lineno}", linecache.getline(filename, lineno).strip()


# Switches with which models choose their SDPA path over the hand-written one (nanoGPT, timm, others).
_SDPA_FLAGS = ("flash", "fused_attn", "use_flash", "use_sdpa", "use_flash_attn")


def _sdpa_flag_off(module: nn.Module) -> str | None:
    """The name of the module's SDPA switch when it is off (``self.flash = False``), else None."""
    return next((f for f in _SDPA_FLAGS if getattr(module, f, None) is False), None)


def _hand_written_modules(root: nn.Module) -> list[HandWritten]:
    """Modules whose class computes softmax over a matrix product and never calls SDPA."""
    found = []
    for path, m in root.named_modules():
        cls = type(m)
        if _is_library_class(cls) or class_calls_sdpa(cls):
            continue
        for klass in cls.__mro__:
            if _is_library_class(klass):
                continue
            hit = next((h for h in map(_softmax_over_matmul, _functions_of_class(klass)) if h), None)
            if hit:
                found.append(HandWritten(path or type(root).__name__, cls.__name__, *hit,
                                         flag_off=_sdpa_flag_off(m)))
                break
    return found


_ONE_LINE_CHANGE = (
    "attnkit sees calls to torch.nn.functional.scaled_dot_product_attention: replace the lines from "
    "the scores to `weights @ v` with `y = F.scaled_dot_product_attention(q, k, v, is_causal=True)` "
    "(attn_mask=mask instead of is_causal for another mask; dropout_p=p while training)"
)


def _describe(found: list[HandWritten], prefix: str) -> str:
    first = found[0]
    others = f" and {len(found) - 1} more like it" if len(found) > 1 else ""
    line = f": `{first.line}`" if first.line else ""
    flag = (f"; its `{first.flag_off}` flag is off, and `{first.flag_off} = True` (the model's own switch) is that change"
            if first.flag_off else "")
    return (f"{prefix}{first.path} ({first.cls}, {first.where}{line}){others} computes softmax attention by "
            f"hand; {_ONE_LINE_CHANGE}{flag}")


def unreachable_hint(root: nn.Module) -> str | None:
    """A sentence naming the hand-written attention of a model no adapter reaches, or None."""
    found = _hand_written_modules(root)
    return _describe(found, "") if found else None


# --------------------------------------------------------------------------- the module stack and the mode
@dataclass
class _Frame:
    """One running forward of a hooked module."""

    module: nn.Module
    foreign: bool
    sdpa_calls: int = 0
    watching: bool = False  # following matmul results to a softmax (hand-written attention)
    from_matmul: dict[int, Tensor] = field(default_factory=dict)
    hand_written_at: tuple[str, str] | None = None


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.stack: list[_Frame] = []
        self.mode: _SdpaMode | None = None
        self.forward_routed = 0  # SDPA calls routed in the current forward of an attached model
        self.forward_hand_written: list[HandWritten] = []


_state = _ThreadState()
# module -> [sessions' count, the instance forward it had before]
_ROUTED_MODULES: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_FOREIGN: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()  # module -> [count, hook handles]
_ROOTS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()  # root -> [count, handles]
_PATHS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()  # qualified names, for messages
_ROUTED_BEFORE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # modules known to call SDPA: not watched


class _SdpaMode(TorchFunctionMode):
    """Active while an attention module's forward runs: routes its SDPA calls through the seam.

    Inside ``__torch_function__`` torch takes this mode off the stack, so what the seam computes
    (the native SDPA call, the dense kernel, the observation pass) is not intercepted again.
    """

    def __torch_function__(self, func, _types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = _state.stack[-1] if _state.stack else None
        if frame is None or frame.foreign:
            return func(*args, **kwargs)
        if func is _SDPA:
            return _route(frame, args, kwargs)
        if frame.watching:
            return _follow(frame, func, args, kwargs)
        return func(*args, **kwargs)


def _tensors(values) -> list[Tensor]:
    out = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(t for t in v if isinstance(t, Tensor))
    return out


def _caller_line() -> tuple[str, str]:
    """file:line and text of the first frame outside torch and attnkit (the model's own line)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/torch/" not in name and "/attnkit/seam/" not in name:
            return f"{name}:{f.f_lineno}", linecache.getline(name, f.f_lineno).strip()
        f = f.f_back
    return "?", ""


def _follow(frame: _Frame, func, args, kwargs):
    """Run ``func``, keeping track of tensors derived from a matrix product; a softmax over the
    last dimension of one is hand-written attention."""
    result = func(*args, **kwargs)
    name = getattr(func, "__name__", "")
    inputs = _tensors((*args, *kwargs.values()))
    derived = name in _MATMUL_NAMES or any(id(t) in frame.from_matmul for t in inputs)
    if not derived:
        return result
    if name in _SOFTMAX_NAMES and inputs and inputs[0].dim() >= 3:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim in (-1, inputs[0].dim() - 1) and frame.hand_written_at is None:
            frame.hand_written_at = _caller_line()
            frame.watching = False  # found: stop following
            frame.from_matmul.clear()
            return result
    for t in _tensors(result if isinstance(result, (list, tuple)) else (result,)):
        frame.from_matmul[id(t)] = t  # held (so the id is not reused) until the module's forward ends
    return result


def _bind(args: tuple, kwargs: dict) -> dict:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMETERS, args))
    bound.update(kwargs)
    return bound


def _route(frame: _Frame, args: tuple, kwargs: dict) -> Tensor:
    """One SDPA call of ``frame.module``, through the sessions attached to it."""
    frame.sdpa_calls += 1
    frame.watching = False
    frame.from_matmul.clear()
    _ROUTED_BEFORE.add(frame.module)
    attachment = attachment_of(frame.module)
    a = _bind(args, kwargs)
    query, key, value = a["query"], a["key"], a["value"]
    attn_mask, dropout_p, is_causal, scale, enable_gqa = (
        a["attn_mask"], a["dropout_p"], a["is_causal"], a["scale"], a["enable_gqa"])
    unbatched_heads = query.dim() == 3  # (N, L, E): heads folded into the batch, or one head
    routable = (
        attachment is not None
        and query.dim() in (3, 4) and key.dim() == query.dim() and value.dim() == query.dim()
        and not (is_causal and attn_mask is not None)  # SDPA refuses both: let it say so
        and (query.shape[-3] == key.shape[-3] or (enable_gqa and not unbatched_heads))
        and (attn_mask is None or attn_mask.dim() <= query.dim())
    )
    if not routable:
        return _SDPA(*args, **kwargs)

    if unbatched_heads:
        q4, k4, v4 = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        mask4 = attn_mask.unsqueeze(-3) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
    else:
        q4, k4, v4, mask4 = query, key, value, attn_mask
    causal = bool(is_causal)
    L, S = q4.shape[-2], k4.shape[-2]
    if causal and L != S:
        # SDPA's is_causal is the top-left lower triangle (query i sees keys 0..i); the seam's
        # causal pattern is aligned to the bottom right (a KV cache): pass SDPA's own pattern.
        mask4 = torch.ones(L, S, dtype=torch.bool, device=q4.device).tril()
        causal = False
    default_scale = query.shape[-1] ** -0.5

    def native(scale_used: float) -> Tensor:  # (B, H, Q, Dv): the model's own call, argument for argument
        s = scale if scale_used == (scale if scale is not None else default_scale) else scale_used
        out = _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=s, enable_gqa=enable_gqa)
        return out.unsqueeze(1) if unbatched_heads else out

    recompute = in_backward()
    site = attachment.sites.site_of(frame.module, count=not recompute)
    call = build_call(frame.module, site, q4, k4, v4, mask=mask4, scale=scale, is_causal=causal,
                      dropout=float(dropout_p), native=native)
    if not recompute:
        _state.forward_routed += 1
    out = run_call(call, attachment.sessions, recompute)
    return out.squeeze(1) if unbatched_heads else out


def _push(module: nn.Module, foreign: bool) -> None:
    watching = not foreign and module not in _ROUTED_BEFORE and not in_backward()
    if not _state.stack:
        _state.mode = _SdpaMode()
        _state.mode.__enter__()
    _state.stack.append(_Frame(module, foreign, watching=watching))


def _pop(module: nn.Module) -> None:
    if not _state.stack or _state.stack[-1].module is not module:
        return  # a forward that raised before our pre-hook ran (another pre-hook failed)
    frame = _state.stack.pop()
    if not _state.stack and _state.mode is not None:
        mode, _state.mode = _state.mode, None
        mode.__exit__(None, None, None)
    if frame.hand_written_at is not None and frame.sdpa_calls == 0:
        where, line = frame.hand_written_at
        _state.forward_hand_written.append(
            HandWritten(_PATHS.get(module, type(module).__name__), type(module).__name__, where, line,
                        flag_off=_sdpa_flag_off(module)))


def _routed_forward(module: nn.Module, previous: Callable | None) -> Callable:
    """The instance ``forward`` of an attention module while a session is attached: its own forward
    with the mode on. It runs outside dynamo (a compiled model graph-breaks around it): dynamo does
    not guard on hooks added after compiling, but it does see an instance ``forward``."""
    inner = previous if previous is not None else types.MethodType(type(module).forward, module)

    @torch.compiler.disable
    @functools.wraps(inner)
    def forward(*args, **kwargs):
        _push(module, foreign=False)
        try:
            return inner(*args, **kwargs)
        finally:
            _pop(module)

    return forward


def _foreign_pre_hook(module: nn.Module, _args) -> None:
    _push(module, foreign=True)


def _foreign_post_hook(module: nn.Module, _args, _output) -> None:
    _pop(module)


def _root_pre_hook(_root: nn.Module, _args) -> None:
    _state.forward_routed = 0
    _state.forward_hand_written = []


_warned: set[tuple[int, str]] = set()


def _root_post_hook(root: nn.Module, _args, _output) -> None:
    found, routed = _state.forward_hand_written, _state.forward_routed
    _state.forward_hand_written = []
    if not found:
        return
    if routed == 0:
        raise NoAttentionError(_describe(found, f"{type(root).__name__} ran no attention call attnkit could see: "))
    key = (id(root), found[0].path)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(_describe(found, "attnkit does not see "), stacklevel=2)


def _route_module(module: nn.Module) -> None:
    entry = _ROUTED_MODULES.get(module)
    if entry is None:
        previous = module.__dict__.get("forward")
        _ROUTED_MODULES[module] = entry = [0, previous]
        module.forward = _routed_forward(module, previous)
    entry[0] += 1


def _unroute_module(module: nn.Module) -> None:
    entry = _ROUTED_MODULES.get(module)
    if entry is None:  # already undone
        return
    entry[0] -= 1
    if entry[0] == 0:
        del _ROUTED_MODULES[module]
        module.__dict__.pop("forward", None)
        if entry[1] is not None:
            module.forward = entry[1]


def _mark_foreign(module: nn.Module) -> None:
    """Hooks that tell the mode it is inside a module another adapter owns (SDPA calls there are theirs)."""
    entry = _FOREIGN.get(module)
    if entry is None:
        handles = [module.register_forward_pre_hook(_foreign_pre_hook),
                   module.register_forward_hook(_foreign_post_hook, always_call=True)]
        _FOREIGN[module] = entry = [0, handles]
    entry[0] += 1


def _unmark_foreign(module: nn.Module) -> None:
    entry = _FOREIGN.get(module)
    if entry is None:  # already undone
        return
    entry[0] -= 1
    if entry[0] == 0:
        for handle in entry[1]:
            handle.remove()
        del _FOREIGN[module]


def install(root: nn.Module, modules: list[nn.Module]) -> Callable[[], None]:
    """Give ``modules`` an instance ``forward`` that runs their own with the mode on, and mark the
    foreign attention modules inside them; the returned function undoes exactly this (nested
    sessions share one install: the last one out restores the forward the module had)."""
    mine = {id(m) for m in modules}
    inside = {id(sub) for m in modules for sub in m.modules()}
    foreign = [f for f in _foreign_modules(root) if id(f) in inside and id(f) not in mine]
    for path, m in root.named_modules():
        if id(m) in mine:
            _PATHS[m] = path or type(root).__name__
    # weak references: an attachment never closed must not keep the model alive through its undo
    routed: list[weakref.ref] = []
    marked: list[weakref.ref] = []
    rooted: list[weakref.ref] = []

    def restore() -> None:
        for m in filter(None, (r() for r in routed)):
            _unroute_module(m)
        for f in filter(None, (r() for r in marked)):
            _unmark_foreign(f)
        for r in filter(None, (r() for r in rooted)):
            entry = _ROOTS.get(r)
            if entry is None:
                continue
            entry[0] -= 1
            if entry[0] == 0:
                for handle in entry[1]:
                    handle.remove()
                del _ROOTS[r]
        routed.clear(), marked.clear(), rooted.clear()

    try:
        for m in modules:
            _route_module(m)
            routed.append(weakref.ref(m))
        for f in foreign:
            _mark_foreign(f)
            marked.append(weakref.ref(f))
        entry = _ROOTS.get(root)
        if entry is None:
            _ROOTS[root] = entry = [0, [root.register_forward_pre_hook(_root_pre_hook),
                                        root.register_forward_hook(_root_post_hook)]]
        entry[0] += 1
        rooted.append(weakref.ref(root))
    except BaseException:
        restore()
        raise
    return restore
