"""Modifiers of the attention call: score modifiers here and in ``score/``, mask modifiers in ``mask/``.

Score modifiers have FlexAttention's signature: ``score_mod(score, b, h, q_idx, kv_idx) -> score``.

Each is a plain function of tensors (attention-gym style, one small file each) that runs the
same way on a whole (B, H, R, K) block of logits with broadcast index tensors (attnkit's dense
kernel, on any device) and on scalars inside ``torch.nn.attention.flex_attention``. ``q_idx`` is
the query's position among the keys (its FlexAttention index plus the KV-cache offset).

    from attnkit.seam.mods import soft_cap, temperature
    with attach(model, score_mods=[soft_cap(30.0)]):     # Gemma-2 style capping
        model(ids)

``SCORE_MODS`` maps a name to a factory of score modifiers; ``PATTERNS`` maps the ablation
patterns of ``validate`` (uniform, local window, first token, previous token) to the score and
mask modifiers that produce them, ready to splat into ``attach(model, **PATTERNS["uniform"])``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from attnkit.seam.mods.mask import local_window
from attnkit.seam.mods.score.clamp import clamp
from attnkit.seam.mods.score.constant import constant_scores
from attnkit.seam.mods.score.first_key import first_visible_key
from attnkit.seam.mods.score.previous_key import previous_key
from attnkit.seam.mods.score.softcap import soft_cap
from attnkit.seam.mods.score.temperature import temperature

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

SCORE_MODS: dict[str, Callable[..., ScoreMod]] = {
    "temperature": temperature,
    "soft_cap": soft_cap,
    "clamp": clamp,
}


def local_pattern(window: int) -> dict[str, list]:
    """Uniform attention over the keys within ``window`` positions of the query (``PATTERNS["local"]``: 5)."""
    return {"score_mods": [constant_scores], "mask_mods": [local_window(window)]}


PATTERNS: dict[str, dict[str, list]] = {
    # every visible key gets 1/n: attention as plain averaging (beta = 1/N)
    "uniform": {"score_mods": [constant_scores]},
    # uniform over the visible keys within 5 positions of the query (|i - j| <= 5)
    "local": local_pattern(5),
    # all mass on the first visible key: the pure attention-sink pattern
    "first_token": {"score_mods": [first_visible_key]},
    # all mass on the key just before the query (itself for the first row)
    "previous_token": {"score_mods": [previous_key]},
}

__all__ = [
    "PATTERNS", "SCORE_MODS", "ScoreMod", "clamp", "constant_scores", "first_visible_key", "local_pattern",
    "previous_key", "soft_cap", "temperature",
]
