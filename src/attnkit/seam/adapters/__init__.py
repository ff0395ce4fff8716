"""Adapters: how attnkit reaches a model's attention calls, one file per kind of model.

Each adapter has ``find(root) -> [modules]`` (the attention modules it reaches) and
``install(root, modules) -> restore`` (route their calls through the seam; ``restore`` undoes
exactly that, and nested sessions share one install).
"""

from attnkit.seam.adapters import hf, mha, protocol, sdpa_function

ADAPTERS = {
    "huggingface": hf,
    "multihead_attention": mha,
    "protocol": protocol,
    "sdpa_function": sdpa_function,  # last: it leaves the modules above to their own adapters
}

__all__ = ["ADAPTERS"]
