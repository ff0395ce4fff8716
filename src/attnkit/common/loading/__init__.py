"""Resolve a MODEL argument (built-in name, local directory, hub id, ``module.path:factory``) to a model."""

from attnkit.common.loading.registry import BUILTIN_MODELS, DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "LoadedModel", "load_model"]
