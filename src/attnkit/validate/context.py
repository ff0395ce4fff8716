"""What every section function receives."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from attnkit.validate.capture import Captured
from attnkit.validate.options import Options


@dataclass
class Context:
    model: nn.Module
    tokenizer: object
    name: str
    kind: str  # "causal-lm" or "encoder"
    captured: Captured
    ablation_ids: Tensor  # (N, T) held-out blocks
    data_source: str = ""
    options: Options = field(default_factory=Options)

    @property
    def causal_lm(self) -> bool:
        return self.kind == "causal-lm"
