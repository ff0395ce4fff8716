"""Resolve a MODEL argument (built-in name, local directory, hub id, ``module.path:factory``) to a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnkit.common.lazy import lazy_exports

# name -> the module that defines it, imported on first use (see attnkit.common.lazy)
_EXPORTS = {
    "BUILTIN_MODELS": "attnkit.common.loading.builtin",
    "DEFAULT_MODEL": "attnkit.common.loading.builtin",
    "LoadedModel": "attnkit.common.loading.builtin",
    "load_model": "attnkit.common.loading.registry",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and the API reference read
    from attnkit.common.loading.builtin import BUILTIN_MODELS, DEFAULT_MODEL, LoadedModel
    from attnkit.common.loading.registry import load_model
