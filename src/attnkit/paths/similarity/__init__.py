"""Cross-path similarity functions: a registry of small modules, one file each.

A similarity maps the N paths' next-token distributions ``p`` of shape ``(..., N, V)`` to a score
matrix ``S`` of shape ``(..., N, N)``; :func:`attnkit.paths.weights.path_weights` turns it into blend
weights (temperature softmax over j != i, inactive paths masked). Every similarity is an
``nn.Module`` (the parameter-free ones have no parameters), computes in float32 at least (float64
stays float64), and is safe for peaked, near-uniform and identical distributions.

    >>> import torch
    >>> from attnkit.paths.similarity import make_similarity
    >>> sim = make_similarity("cosine")
    >>> sim(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    tensor([[1.0000, 0.6000],
            [0.6000, 1.0000]])

A new variant is one file with a module class and ``@register_similarity("name")``.
"""

from attnkit.paths.similarity.base import SIMILARITIES, list_similarities, make_similarity, register_similarity, upcast

# the built-in variants register themselves on import
from attnkit.paths.similarity import (  # noqa: F401
    bahdanau,
    bhattacharyya,
    cosine,
    jensen_shannon,
    luong,
    raw_dot,
    scaled_dot,
)

__all__ = ["SIMILARITIES", "list_similarities", "make_similarity", "register_similarity", "upcast"]
