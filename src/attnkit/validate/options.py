"""What validate judges by: every threshold and size, with its meaning (torch-free: the CLI shows the defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Options:
    """Thresholds and sizes; every number a section judges by is here, with its meaning."""

    seq_len: int = 128
    sequences: int = 4  # sequences captured for sections 1-8
    ablation_blocks: int = 32  # held-out blocks for the ablation
    batch_size: int = 8
    window: int = 5  # "nearby" and the local ablation: |i - j| <= window
    alpha: float = 0.01  # family-wise significance level, Bonferroni over heads
    uniform_margin: float = 0.02  # 1 - H/ln n below this counts as "nearly uniform" (H/H_max > 0.98)
    sharp_below: float = 0.5  # H/ln n < 0.5: the head spreads over fewer than sqrt(n) keys
    uniform_above: float = 0.9  # H/ln n >= 0.9: the head spreads over more than n^0.9 keys
    query_variation_high: float = 0.05  # rows of one head differ clearly
    query_variation_low: float = 0.02  # rows of one head barely differ
    diversity_high: float = 0.3  # hidden states count as diverse (mu_dist > 0.3)
    ablation_margin: float = 0.05  # nats of loss (about 5 % perplexity) that count as "clearly better"
    output_change_margin: float = 0.01  # encoders: 1 - cosine below this counts as "no change"
    # Evidence minimums (see attnkit.validate.summary.apply_evidence): below them a warning or
    # critical verdict becomes "inconclusive" (ℹ) and the conclusion says so.
    # A head's mean H/H_max over n rows has a standard error of up to 0.5/sqrt(n): 0.09 at 32
    # rows, as wide as the band between "uniform" (0.9) and "nearly uniform" (0.98).
    min_rows: int = 32  # query rows per head that see >= 2 keys, for sections 2-7
    # Ablation: on the reference model the per-token loss difference (uniform - learned) has a
    # std of 2.25 nats (KJV test, 4,064 tokens), so 256 predicted tokens put the standard error of
    # the loss difference at about 0.14 nats; 4 tokens (two words of text) at 1.1 nats.
    min_ablation_tokens: int = 256  # predicted (LM) or output (encoder) tokens, for section 9
    seed: int = 0
