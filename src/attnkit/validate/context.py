"""What every section function receives."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from attnkit.common.distributed import DistEnv
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
    env: DistEnv = field(default_factory=DistEnv)  # under torchrun: the ablation's blocks are shared among the ranks

    @property
    def causal_lm(self) -> bool:
        return self.kind == "causal-lm"
