"""attnkit: find, explain and fix what goes wrong inside the attention of PyTorch transformers."""

__version__ = "0.1.0"
