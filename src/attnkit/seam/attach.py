"""``attach``: put a session between a model and its attention calls, and take it away again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from attnkit.errors import UserError
from attnkit.seam import hf, mha, protocol
from attnkit.seam.session import AttentionSession

# Each adapter installs itself on the attention sites it recognises and returns a function
# that undoes exactly what it did, or None when the model has no site of its kind.
ADAPTERS: dict[str, Callable[[nn.Module, AttentionSession], Callable[[], None] | None]] = {
    "huggingface": hf.install,
    "multihead_attention": mha.install,
    "protocol": protocol.install,
}


class NoAttentionError(UserError):
    """The model has no attention attnkit can reach."""


@contextmanager
def attach(model: nn.Module, session: AttentionSession | None = None, **session_kwargs) -> Iterator[AttentionSession]:
    """Route every attention call of ``model`` through ``session`` inside the ``with`` block.

    Either pass a session or the keyword arguments of ``AttentionSession``. On leaving the
    block (also through an exception) the model is exactly as it was: attention
    implementation, forward methods, backend flags.
    """
    session = session or AttentionSession(**session_kwargs)
    restores: list[Callable[[], None]] = []
    try:
        for install in ADAPTERS.values():
            restore = install(model, session)
            if restore is not None:
                restores.append(restore)
        if not restores:
            raise NoAttentionError(
                f"{type(model).__name__} has no attention attnkit can reach: no Hugging Face attention "
                "interface, no nn.MultiheadAttention, no module marked is_attnkit_attention"
            )
        yield session
    finally:
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
            session.start_forward()
            return model(**inputs)
    except (IndexError, RuntimeError) as e:
        if "index out of range" in str(e):
            raise UserError(f"the input does not fit the model: {e}") from e
        raise
    finally:
        model.train(was_training)
