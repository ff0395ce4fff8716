"""Load a directory ``attnkit gate`` wrote: the model as it was, with its gates added back."""

from __future__ import annotations

import os

from attnkit.common.loading.registry import load_model
from attnkit.gate.io import read_gate_config


def load_gated(directory: str | os.PathLike, **load_kwargs):
    """A directory ``attnkit gate`` wrote (the model + its gates): ``attnkit.common.loading.registry.load_model``
    of the directory, with the gates added back. Returns the ``LoadedModel``."""
    read_gate_config(directory)  # a clear error before the model loads
    return load_model(str(directory), **load_kwargs)  # which adds the gates of a gated directory
