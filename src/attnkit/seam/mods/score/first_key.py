"""All attention on the first key a row can see (the pure attention-sink pattern).

Each later key scores 1e9 lower than the one before it, so after softmax's max-subtraction
every key but the first visible one gets exp(-1e9) = 0 exactly: a one-hot row in float32,
whatever the padding, without knowing the mask.

    with attach(model, score_mods=[first_visible_key]):
        model(ids)
"""

from __future__ import annotations

from torch import Tensor

STEP = 1e9


def first_visible_key(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return (kv_idx * -STEP).to(score.dtype).expand_as(score)
