"""Shared plumbing beneath the features: model loading, corpora, atomic writes, progress, training loop.

Nothing here knows about a particular feature; every feature may import it. Imports are per module
(``attnkit.common.io``, ``attnkit.common.loading``...): this package imports nothing on its own.
"""
