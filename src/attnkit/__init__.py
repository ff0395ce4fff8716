"""attnkit: find, explain and fix what goes wrong inside the attention of PyTorch transformers.

The front door. Everything a script needs is one attribute away, and nothing heavy is imported
until it is used (``import attnkit`` does not import torch)::

    import attnkit

    model, tokenizer = attnkit.load_model("reference")       # a built-in name, a directory, a hub id
    inputs = tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt")
    analysis = attnkit.analyze(model, dict(inputs))           # per-head statistics and diagnoses
    report = attnkit.check(model, seq_len=128, dtype="bf16")  # numerically safe in bf16?

Each public name resolves, on first use, to the object named in ``_PUBLIC`` (PEP 562).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# name -> "module:attribute" (or "module" for a package). Where each thing lives today; the
# front door only points there.
_PUBLIC: dict[str, str] = {
    # features: each package is callable as its own main function (see _FrontDoor below)
    "analyze": "attnkit.analyze",
    "check": "attnkit.check",
    "validate": "attnkit.validate",
    # what the features return
    "Analysis": "attnkit.analyze:Analysis",
    "Analyzer": "attnkit.analyze:Analyzer",
    "CheckReport": "attnkit.check:CheckReport",
    "ValidationReport": "attnkit.validate:ValidationReport",
    "ValidateOptions": "attnkit.validate:Options",
    # the seam
    "attach": "attnkit.seam:attach",
    "Site": "attnkit.seam:Site",
    "StatsCollector": "attnkit.seam.taps:StatsCollector",
    "MapCapture": "attnkit.seam.taps:MapCapture",
    "soft_cap": "attnkit.seam.mods:soft_cap",
    "temperature": "attnkit.seam.mods:temperature",
    "ABLATIONS": "attnkit.seam.mods:PATTERNS",
    # training: watch, warn, act
    "AttentionMonitor": "attnkit.monitor:AttentionMonitor",
    "Policy": "attnkit.monitor:Policy",
    # gates on the attention output
    "add_gates": "attnkit.gate:add_gates",
    "GateStats": "attnkit.gate:GateStats",
    # block-sparse attention
    "sparse_attention": "attnkit.sparse:sparse_attention",
    "SparseConfig": "attnkit.sparse:SparseConfig",
    "make_gates": "attnkit.sparse:make_gates",
    # multi-path decoding
    "generate_paths": "attnkit.paths:generate_paths",
    "make_similarity": "attnkit.paths:make_similarity",
    # errors a user can cause
    "UserError": "attnkit.errors:UserError",
}

# The packages that share their name with a feature's main function.
_CALLABLE_PACKAGES = ("analyze", "check", "validate")

__all__ = ["__version__", "load_model", *_PUBLIC]


def load_model(name_or_path: str = "reference", *, dtype: Any = "float32", **options: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a MODEL as the command line takes it, in eval mode.

    ``name_or_path``: a built-in name (``reference``, ``reference-long``, ``minilm``), a local
    Hugging Face directory (a gated one, written by ``attnkit gate``, comes with its gates), a hub
    id when a hub is reachable, or your own model as ``module.path:factory`` with ``checkpoint=``,
    ``config=`` and ``tokenizer=``. ``dtype``: a ``torch.dtype`` or its name (``"bfloat16"``).
    A model that cannot be found or read raises ``attnkit.UserError`` with one sentence.
    """
    import torch

    from attnkit.common.loading.registry import load_model as _load

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise _resolve("UserError")(f"unknown dtype {dtype!r}; give e.g. 'float32', 'float16' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    loaded = _load(name_or_path, dtype=dtype, **options)
    return loaded.model, loaded.tokenizer


def _resolve(name: str) -> Any:
    module_name, _, attribute = _PUBLIC[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


class _CallablePackage(types.ModuleType):
    """A feature package called as its main function: ``attnkit.analyze(...)`` is
    ``attnkit.analyze.analyze(...)``, while ``attnkit.analyze.diagnose`` stays the module."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _feature(name: str) -> property:
    # A property, not __getattr__: Python's import binds ``attnkit.analyze`` to the package as soon
    # as anything imports ``attnkit.analyze.<x>``, and __getattr__ is then never asked again.
    def get(self: types.ModuleType) -> Any:
        package = importlib.import_module(f"attnkit.{name}")
        if not callable(package):
            package.__class__ = _CallablePackage
        return package

    def set_(self: types.ModuleType, value: Any) -> None:
        pass  # the import system binding the package it just imported: the getter finds it in sys.modules

    return property(get, set_)


def __getattr__(name: str) -> Any:  # PEP 562: asked only for names not yet set
    if name in _PUBLIC:
        value = _resolve(name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


class _FrontDoor(types.ModuleType):
    """attnkit's module type: the callable feature packages are properties (see ``_feature``)."""


for _name in _CALLABLE_PACKAGES:
    setattr(_FrontDoor, _name, _feature(_name))
sys.modules[__name__].__class__ = _FrontDoor
