"""``attach``: put a session between a model and its attention calls, and take it away again.

Sessions stack: attaching a second session to a model (nested, or alongside from elsewhere)
adds it to the calls' sessions; leaving a ``with`` block removes exactly its own session and
undoes its own install, and the model is switched back when the last one leaves. A model
wrapped in ``DistributedDataParallel``, ``torch.compile``, FSDP or any module of the user's
is searched through: every attention inside is reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

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


@contextmanager
def attach(model: nn.Module, session: AttentionSession | None = None, **session_kwargs) -> Iterator[AttentionSession]:
    """Route every attention call of ``model`` through ``session`` inside the ``with`` block.

    Either pass a session or the keyword arguments of ``AttentionSession``. On leaving the
    block (also through an exception) the model is exactly as it was: attention
    implementation, forward methods, backend flags, hooks.
    """
    session = session or AttentionSession(**session_kwargs)
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
    restores: list[Callable[[], None]] = []
    joined: list[nn.Module] = []
    hook = end_hook = None
    try:
        for name, adapter in ADAPTERS.items():
            if found[name]:
                restores.append(adapter.install(root, found[name]))
        for m in modules:
            _ATTACHED.setdefault(m, Attachment([], sites)).sessions.append(session)
            joined.append(m)

        def start_forward(_module, _args) -> None:
            sites.start_forward()
            session.start_forward()

        def end_forward(_module, _args, _output) -> None:
            sites.end_forward()  # a looped layer's passes are counted within one forward only

        hook = model.register_forward_pre_hook(start_forward)
        end_hook = model.register_forward_hook(end_forward, always_call=True)
        yield session
    finally:
        if hook is not None:
            hook.remove()
        if end_hook is not None:
            end_hook.remove()
        for m in joined:
            attachment = _ATTACHED[m]
            mine = max(i for i, s in enumerate(attachment.sessions) if s is session)
            del attachment.sessions[mine]
            if not attachment.sessions:
                del _ATTACHED[m]
        for restore in reversed(restores):
            restore()


def observe_forward(model: nn.Module, session: AttentionSession, **inputs):
    """One forward of ``model`` through ``session``, in eval mode without gradients.

    The model is left as it was found (training mode included), also when the forward raises;
    an input the model cannot embed (a token id past the vocabulary, a position past the
    table) becomes a ``UserError``.
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), attach(model, session):
            return model(**inputs)
    except (IndexError, RuntimeError) as e:
        if "index out of range" in str(e):
            raise UserError(f"the input does not fit the model: {e}") from e
        raise
    finally:
        model.train(was_training)
