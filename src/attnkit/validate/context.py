"""What every section function receives."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from attnkit.validate.capture import Captured


@dataclass
class Options:
    """Thresholds and sizes; every number a section judges by is here, with its meaning."""

    seq_len: int = 128
    sequences: int = 4  # sequences captured for sections 1-8
    ablation_blocks: int = 32  # held-out blocks for the ablation
    batch_size: int = 8
    window: int = 5  # "nearby" and the local ablation: |i - j| <= window (seed 002)
    alpha: float = 0.01  # family-wise significance level, Bonferroni over heads
    uniform_margin: float = 0.02  # 1 - H/ln n below this counts as "nearly uniform" (H/H_max > 0.98)
    sharp_below: float = 0.5  # H/ln n < 0.5: the head spreads over fewer than sqrt(n) keys
    uniform_above: float = 0.9  # H/ln n >= 0.9: the head spreads over more than n^0.9 keys
    query_variation_high: float = 0.05  # seed 002: "Query variation > 0.05"
    query_variation_low: float = 0.02  # seed 002: "Query variation < 0.02"
    diversity_high: float = 0.3  # seed 002 section 7: "beliefs diverse (mu_dist > 0.3)"
    ablation_margin: float = 0.05  # nats of loss (about 5 % perplexity) that count as "clearly better"
    output_change_margin: float = 0.01  # encoders: 1 - cosine below this counts as "no change"
    seed: int = 0


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
