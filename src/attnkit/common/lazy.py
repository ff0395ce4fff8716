"""Package exports imported on first use (PEP 562), so that importing a package stays cheap.

The command line reads option defaults and choices from feature packages (``attnkit.validate``'s
``Options``, ``attnkit.gate``'s kinds) to print its ``--help``; with every export imported up front
that pulled in torch and transformers for a help text. A package lists what it exports and where
each name is defined; a name is imported when it is first read:

    _EXPORTS = {"validate": "attnkit.validate.run", "Options": "attnkit.validate.options"}
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
    __all__ = sorted(_EXPORTS)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, importing ``exports[name]`` for ``name``."""
    module = importlib.import_module(package)

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(module, name, value)  # imported once; later reads are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(exports))

    return __getattr__, __dir__
