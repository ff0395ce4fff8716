"""attnkit: find, explain and fix what goes wrong inside the attention of PyTorch transformers."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``attnkit.check(config, seq_len=..., dtype=...)`` without importing torch-heavy parts up front."""
    if name == "check":
        import importlib

        return importlib.import_module("attnkit.check")
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
