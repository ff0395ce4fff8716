"""``eager_under_compile``: ``torch.compiler.disable`` without importing torch's compiler at import time.

attnkit's Python in the attention call runs eagerly; a ``torch.compile``'d model graph-breaks around
it. ``torch.compiler.disable`` says so, but applied as a decorator it imports ``torch._dynamo`` when
attnkit is imported: seconds (6 s on a loaded machine) that a process that never compiles, such as
``attnkit monitor report``, need not pay. Nothing can be compiling before ``torch._dynamo`` has been
imported (``torch.compile`` imports it, and so do transformers' mask functions), so until then the
function runs as it is; from the first call after, through its ``torch.compiler.disable`` version.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_under_compile(fn: F) -> F:
    """``fn``, run outside any ``torch.compile`` graph (as ``torch.compiler.disable(fn)``), importing nothing."""
    disabled: Callable | None = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:  # no compiler loaded: nothing is compiling
                return fn(*args, **kwargs)
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call  # type: ignore[return-value]
