"""attnkit's own models: the built-in reference models' files (``reference/``, ``reference_long/``),
the TransformerAE and the CNN zoo it merges. Loading any MODEL argument is ``attnkit.common.loading``."""
