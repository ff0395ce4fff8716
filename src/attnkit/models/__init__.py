"""Built-in models and the loader that resolves a MODEL argument (built-in name, local directory, hub id)."""

from attnkit.models.registry import BUILTIN_MODELS, LoadedModel, load_model

__all__ = ["BUILTIN_MODELS", "LoadedModel", "load_model"]
