"""``attach``: put a session between a model and its attention calls, and take it away again.

Sessions stack: attaching a second session to a model (nested, or alongside from elsewhere)
adds it to the calls' sessions; leaving a ``with`` block removes exactly its own session and
undoes its own install, and the model is switched back when the last one leaves. A model
wrapped in ``DistributedDataParallel``, ``torch.compile``, FSDP or any module of the user's
is searched through: every attention inside is reached.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.hooks import RemovableHandle

from attnkit.errors import NoAttentionError, UserError
from attnkit.seam.adapters import ADAPTERS
from attnkit.seam.session import _ATTACHED, AttentionSession, Attachment
from attnkit.seam.sites import SiteTable


_WRAPPERS = ("module", "_orig_mod", "_fsdp_wrapped_module")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` / FSDP wrappers (names read as the user wrote them)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in _WRAPPERS:
            inner = model.__dict__.get("_modules", {}).get(attr)
            if isinstance(inner, nn.Module) and len(model._modules) == 1:
                model = inner
                break
    return model


def attach(model: nn.Module, session: AttentionSession | None = None, **session_kwargs) -> "Attached":
    """Route every attention call of ``model`` through ``session`` inside the ``with`` block.

    Either pass a session or the keyword arguments of ``AttentionSession``. On leaving the
    block (also through an exception) the model is exactly as it was: attention
    implementation, forward methods, backend flags, hooks. An attachment entered and never
    left is undone when it is garbage-collected or at interpreter exit, silently; one that
    outlives its model has nothing left to undo.
    """
    return Attached(model, session or AttentionSession(**session_kwargs))


class Attached:
    """One attachment of a session to a model: ``with attach(model, ...) as session``.

    ``close()`` (what leaving the ``with`` block calls) is idempotent. The undoing is a
    ``weakref.finalize`` that holds the model and its modules only weakly, so it runs exactly
    once: on ``close()``, when this object is collected, or at interpreter exit (while every
    module is still intact), and never keeps the model alive.
    """

    def __init__(self, model: nn.Module, session: AttentionSession) -> None:
        self._model: nn.Module | None = model  # dropped once entered: the model may die first
        self.session = session
        self._finalizer: weakref.finalize | None = None

    def __enter__(self) -> AttentionSession:
        if self._model is None:
            raise RuntimeError("this attachment was already entered; call attach() again for another")
        model, self._model = self._model, None
        undo = _Undo(self.session)
        try:
            _install(model, self.session, undo)
        except BaseException:
            undo()
            raise
        self._finalizer = weakref.finalize(self, undo)
        return self.session

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Detach the session and undo its install (the model's last session out switches it back)."""
        if self._finalizer is not None:
            self._finalizer()  # runs at most once


class _Undo:
    """What one attachment must undo, holding nothing the user's objects could keep alive through it
    (the model, its modules and the session only weakly): a finaliser holding them strongly would
    keep alive a model whose hooks lead back to the attachment."""

    def __init__(self, session: AttentionSession) -> None:
        self.session = weakref.ref(session)
        self.hooks: list[RemovableHandle] = []  # hold their dictionaries weakly
        self.joined: list[weakref.ref] = []  # attention modules this session joined
        self.restores: list[Callable[[], None]] = []  # the adapters' undo functions (weak as well)

    def __call__(self) -> None:
        for hook in self.hooks:
            hook.remove()
        session = self.session()
        for ref in self.joined:
            m = ref()
            attachment = _ATTACHED.get(m) if m is not None else None
            if attachment is None:  # the module is gone, and with it its entry
                continue
            mine = [i for i, s in enumerate(attachment.sessions) if s is session]
            if mine:
                del attachment.sessions[mine[-1]]
            if not attachment.sessions:
                _ATTACHED.pop(m, None)
        for restore in reversed(self.restores):
            restore()
        self.hooks, self.joined, self.restores = [], [], []


def _install(model: nn.Module, session: AttentionSession, undo: _Undo) -> None:
    """Join ``session`` to every attention module of ``model``, recording in ``undo`` each step taken."""
    root = unwrap(model)
    found = {name: adapter.find(root) for name, adapter in ADAPTERS.items()}
    modules = [m for ms in found.values() for m in ms]
    if not modules:
        from attnkit.seam.adapters.sdpa_function import unreachable_hint

        hint = unreachable_hint(root)  # hand-written softmax attention, named with the one-line change
        raise NoAttentionError(
            f"{type(root).__name__} has no attention attnkit can reach: no Hugging Face attention "
            "interface, no nn.MultiheadAttention, no module marked is_attnkit_attention, no call to "
            "F.scaled_dot_product_attention" + (f"; {hint}" if hint else "")
        )
    existing = next((_ATTACHED[m].sites for m in modules if m in _ATTACHED), None)
    sites = existing or SiteTable(root, modules)
    for name, adapter in ADAPTERS.items():
        if found[name]:
            undo.restores.append(adapter.install(root, found[name]))
    for m in modules:
        _ATTACHED.setdefault(m, Attachment([], sites)).sessions.append(session)
        undo.joined.append(weakref.ref(m))

    def start_forward(_module, _args) -> None:
        sites.start_forward()
        session.start_forward()

    def end_forward(_module, _args, _output) -> None:
        sites.end_forward()  # a looped layer's passes are counted within one forward only

    undo.hooks.append(model.register_forward_pre_hook(start_forward))
    undo.hooks.append(model.register_forward_hook(end_forward, always_call=True))


def observe_forward(model: nn.Module, session: AttentionSession, **inputs):
    """One forward of ``model`` through ``session``, in eval mode without gradients.

    The model is left as it was found (training mode included), also when the forward raises;
    an input the model cannot embed (a token id past the vocabulary, a position past the
    table) becomes a ``UserError``.
    """
    with eval_mode(model), attach(model, session):
        return forward_no_grad(model, **inputs)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; afterwards (also through an exception) each module's
    own training flag is put back, so a model half in training mode stays so."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def forward_no_grad(model: nn.Module, **inputs):
    """``model(**inputs)`` without gradients; an input the model cannot embed becomes a ``UserError``."""
    import torch

    try:
        with torch.no_grad():
            return model(**inputs)
    except (IndexError, RuntimeError) as e:
        if "index out of range" in str(e):
            raise UserError(f"the input does not fit the model: {e}") from e
        raise
