"""The logit-maximum estimate: how large attention logits get, from the config (at init) or from
the actual W_q / W_k of a model.

Derivation (at initialisation). A head computes q = W_q x and k = W_k x' with W_q, W_k of shape
d x h, entries of std sigma (the config's ``initializer_range``), and x, x' the attention inputs
after LayerNorm/RMSNorm: unit variance per element, so ||x||^2 ~ h. Then each q_i has variance
h sigma^2, each k_i too, independently (W_q and W_k are independent), and

    q.k = sum over the d head dimensions of q_i k_i   has mean 0 and std  sqrt(d) * h * sigma^2.

The logit is scale * q.k with scale 1/sqrt(d) (so its std is h sigma^2, whatever d), 1/d under
muP (std h sigma^2 / sqrt(d)), or the config's ``scaling`` / ``query_pre_attn_scalar^-1/2``;
a temperature tau divides it. RoPE rotates q and k in pairs of dimensions: norms and this
distribution are unchanged. Over a row of T keys the logits are roughly Gaussian, so the row
maximum grows like sigma_logit sqrt(2 ln T) and the largest logit of a whole forward (n logits:
T(T+1)/2 per head when causal, times heads and layers) like sigma_logit sqrt(2 ln n); the exact
Gaussian extremes are in ``gaussian.py``. Weight growth X (both W_q and W_k grown by X, as in
training) multiplies every logit by X^2.

Bounds: QK-norm makes ||q|| = ||k|| = sqrt(d) g (RMS-normalised, learned gain g, 1 at init), so
|q.k| <= d g^2 and the logit <= scale d g^2 (with q.k = d g^2 cos(angle), std sqrt(d) g^2 at
init); under QK-norm weight growth moves the gains, so X is read as g. Soft-capping maps a logit
L to cap tanh(L / cap): never above the cap (but q.k before it can still overflow fp16).

From weights (``from_weights``): with the real W_q, W_k (and biases a, b) of each head, and the
same unit-variance isotropic inputs, q.k = x^T A^T B x' + a^T B x' + x^T A^T b + a.b has mean a.b
and variance ||A^T B||_F^2 + ||B^T a||^2 + ||A^T b||^2. This ignores the norm's learned gains (folding
GPT-2's ln_1 gains in made the reference model's estimate worse: 0.34x the measured largest
logit instead of 0.50x) and the structure of real hidden states (trained heads align W_q^T W_k with directions the inputs
actually take), so it is an estimate of scale, not a measurement: ``--measure`` gives that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from attnkit.check.gaussian import expected_max, normal_isf, quantile_max
from attnkit.check.shape import AttentionShape, LayerType
from attnkit.common.findings import threshold
from attnkit.errors import UserError
from attnkit.seam.layouts import qk_layout

HIGH_QUANTILE = threshold("high_quantile")  # the "high" estimate: the largest logit stays below it with 99 % probability


@dataclass(frozen=True)
class HeadMoments:
    """Mean and std of one head's raw q.k (before scaling) under the isotropic-input model."""

    mean_raw: float
    sigma_raw: float
    layer: int | None = None
    head: int | None = None


@dataclass
class LogitEstimate:
    layer_type: str
    layers: int
    source: str  # "init (config)", "weights", or with " + QK-norm bound"
    seq_len: int
    keys_seen: int
    temperature: float
    growth: float
    scale: float  # effective: config scale / temperature
    sigma_raw: float  # std of raw q.k (largest head when from weights)
    sigma_logit: float
    logits_per_head: float  # logits in one forward of one sequence, per head
    row_max: float  # expected max of a full-length row
    row_range: float  # expected max - min of a row, averaged over rows (what analyze's logit_range measures)
    head_max: float  # expected largest logit of one head in one forward
    model_max: float  # expected largest logit over every head of this layer type
    model_max_high: float  # its 99 % quantile
    raw_absmax: float  # expected largest |q.k| before scaling (what overflows fp16)
    raw_absmax_high: float
    bound: float | None = None  # hard bound on |logit| (QK-norm), None if unbounded
    softcap: float | None = None
    per_head: list[dict] = field(default_factory=list)  # from weights: each head's predicted figures
    kernel: str | None = None  # the attention implementation (check.kernels): which figure it stores

    def to_dict(self) -> dict:
        return asdict(self)


def logits_per_head(seq_len: int, keys: int, causal: bool) -> float:
    """How many logits one head computes for one sequence (visible ones only)."""
    if causal:
        w = min(keys, seq_len)
        return w * (w + 1) / 2 + (seq_len - w) * w
    return float(seq_len) * keys


def _row_key_counts(seq_len: int, keys: int, causal: bool) -> list[tuple[int, int]]:
    """(keys a row sees, how many rows see that many), rows seeing < 2 keys left out (as analyze does)."""
    if not causal:
        return [(keys, seq_len)] if keys >= 2 else []
    w = min(keys, seq_len)
    counts = [(m, 1) for m in range(2, w + 1)]
    if seq_len > w:
        counts.append((w, seq_len - w))
    if len(counts) > 2048:  # thin out evenly: the mean of a slowly varying function
        step = len(counts) / 2048
        counts = [(counts[int(i * step)][0], max(1, round(step))) for i in range(2048)] + counts[-1:] * (seq_len > w)
    return counts


def mean_row_range(sigma: float, seq_len: int, keys: int, causal: bool) -> float:
    return sigma * _unit_mean_row_range(seq_len, keys, causal)


@lru_cache(maxsize=4096)
def _unit_mean_row_range(seq_len: int, keys: int, causal: bool) -> float:
    """Mean row range for sigma = 1 (the range is linear in sigma; sweeps ask for the same lengths often)."""
    counts = _row_key_counts(seq_len, keys, causal)
    total = sum(c for _, c in counts)
    if total == 0:
        return 0.0
    return sum(2.0 * expected_max(m) * c for m, c in counts) / total


def init_moments(shape: AttentionShape, growth: float = 1.0) -> HeadMoments:
    """Raw q.k moments of a freshly initialised head (see the module docstring)."""
    d, h, s = shape.head_dim, shape.hidden_size, shape.init_std
    if shape.qk_norm:
        return HeadMoments(0.0, math.sqrt(d) * growth**2)
    return HeadMoments(0.0, math.sqrt(d) * h * s * s * growth**2)


def _cap(value: float, softcap: float | None) -> float:
    return softcap * math.tanh(value / softcap) if softcap else value


def _level(moments: list[HeadMoments], n_each: float, expected_count: float, two_sided: bool) -> float:
    """m where the expected number of values above m (over every head's n_each values) is
    ``expected_count``: 0.625 gives Blom's expected maximum, -ln(q) the q-quantile of the maximum."""
    grouped: dict[tuple[float, float], int] = {}  # identical heads (every head at init) counted once
    for mo in moments:
        if mo.sigma_raw > 0 or mo.mean_raw != 0:
            key = (mo.mean_raw, mo.sigma_raw)
            grouped[key] = grouped.get(key, 0) + 1
    if not grouped:
        return 0.0
    moments = [HeadMoments(mean, sigma) for mean, sigma in grouped]
    if len(grouped) == 1:  # closed form: count * n_each * P(Z > z) = expected_count
        (mean, sigma), count = next(iter(grouped.items()))
        if not two_sided or mean == 0:
            tail = expected_count / (count * n_each * (2 if two_sided else 1))
            if tail < 0.5:
                return abs(mean) + sigma * normal_isf(tail)

    def above(m: float) -> float:
        total = 0.0
        for (mean, sigma), count in grouped.items():
            sig = max(sigma, 1e-300)
            part = 0.5 * math.erfc((m - mean) / (sig * math.sqrt(2)))
            if two_sided:
                part += 0.5 * math.erfc((m + mean) / (sig * math.sqrt(2)))
            total += part * count
        return total * n_each

    lo = max(abs(mo.mean_raw) if two_sided else mo.mean_raw for mo in moments) - 1e-12
    hi = max(abs(mo.mean_raw) + 50 * mo.sigma_raw for mo in moments)
    lo = min(lo, hi)
    if above(lo) <= expected_count:
        return lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if above(mid) > expected_count:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * max(1.0, abs(hi)):
            break
    return 0.5 * (lo + hi)


def estimate(
    shape: AttentionShape,
    seq_len: int,
    layer_type: LayerType | None = None,
    temperature: float = 1.0,
    growth: float = 1.0,
    moments: list[HeadMoments] | None = None,
) -> LogitEstimate:
    """Expected and high-quantile logit maxima for one layer type.

    ``moments`` are per-head raw q.k moments from real weights (``from_weights``); without them,
    every head is a freshly initialised one (``init_moments``). ``growth`` multiplies logits by
    growth^2 either way.
    """
    layer_type = layer_type or (shape.layer_types[0] if shape.layer_types else LayerType("full_attention", shape.num_layers))
    keys = layer_type.keys_seen(seq_len)
    scale = shape.scale / temperature
    n = logits_per_head(seq_len, keys, shape.causal)
    if moments is not None and shape.qk_norm:
        moments = None  # QK-norm: q and k are normalised after W_q/W_k, so their scale does not matter
    if moments is None:
        one = init_moments(shape, growth)
        heads = [one] * (shape.num_heads * layer_type.count)
        source = "init (config)"
    else:
        heads = [HeadMoments(mo.mean_raw * growth**2, mo.sigma_raw * growth**2, mo.layer, mo.head) for mo in moments]
        source = "weights"
    if shape.qk_norm:
        source += " + QK-norm bound"
    bound_raw = shape.head_dim * growth**2 if shape.qk_norm else None  # |q.k| <= d g^2

    def raw_to_logit(raw: float) -> float:
        if bound_raw is not None:
            raw = min(raw, bound_raw)
        return _cap(raw * scale, shape.softcap)

    def clip_raw(raw: float) -> float:
        return min(raw, bound_raw) if bound_raw is not None else raw

    top = max(heads, key=lambda mo: abs(mo.mean_raw) + mo.sigma_raw)
    sigma_logit = top.sigma_raw * scale
    per_head = []
    if moments is not None:
        for mo in heads:
            per_head.append({
                "layer": mo.layer, "head": mo.head, "sigma_logit": mo.sigma_raw * scale, "mean_logit": mo.mean_raw * scale,
                "head_max": raw_to_logit(_level([mo], n, 0.625, two_sided=False)),
                "raw_absmax": clip_raw(_level([mo], n, 0.625, two_sided=True)),
                "row_range": _cap(mean_row_range(mo.sigma_raw * scale, seq_len, keys, shape.causal), shape.softcap),
            })
    return LogitEstimate(
        layer_type=layer_type.name,
        layers=layer_type.count,
        source=source,
        seq_len=seq_len,
        keys_seen=keys,
        temperature=temperature,
        growth=growth,
        scale=scale,
        sigma_raw=top.sigma_raw,
        sigma_logit=sigma_logit,
        logits_per_head=n,
        row_max=raw_to_logit(abs(top.mean_raw) + top.sigma_raw * expected_max(keys)),
        row_range=min(_cap(mean_row_range(sigma_logit, seq_len, keys, shape.causal), shape.softcap),
                      2 * shape.softcap if shape.softcap else math.inf,
                      2 * bound_raw * scale if bound_raw is not None else math.inf),
        head_max=raw_to_logit(_level([top], n, 0.625, two_sided=False)),
        model_max=raw_to_logit(_level(heads, n, 0.625, two_sided=False)),
        model_max_high=raw_to_logit(_level(heads, n, -math.log(HIGH_QUANTILE), two_sided=False)),
        raw_absmax=clip_raw(_level(heads, n, 0.625, two_sided=True)),
        raw_absmax_high=clip_raw(_level(heads, n, -math.log(HIGH_QUANTILE), two_sided=True)),
        bound=bound_raw * scale if bound_raw is not None else None,
        softcap=shape.softcap,
        per_head=per_head,
        kernel=shape.kernel,
    )


def moments_from_weights(model) -> dict[int, list[HeadMoments]]:
    """Per layer, each head's raw q.k moments from the model's own W_q, W_k and biases.

    Attention modules are found through the seam's weight layouts (``qk_layout``); a model whose
    attention modules it does not know gives {} (the check then uses the config alone).
    """
    import torch

    found: dict[int, list[HeadMoments]] = {}
    layer = 0
    for module in model.modules():
        if not _looks_like_attention(module):
            continue
        try:
            layout = qk_layout(module)
        except UserError:
            continue
        if getattr(module, "is_cross_attention", False):
            continue
        heads = []
        with torch.no_grad():
            for h in range(layout.num_heads):
                A, a = _matrix_and_bias(layout.q_pieces[h])
                B, b = _matrix_and_bias(layout.k_pieces[layout.kv_head(h)])
                M = A.T @ B  # (hidden, hidden): q.k = x^T M x' + ...
                var = float(M.pow(2).sum())
                mean = 0.0
                if b is not None:
                    var += float((A.T @ b).pow(2).sum())
                if a is not None:
                    var += float((B.T @ a).pow(2).sum())
                if a is not None and b is not None:
                    mean = float(a @ b)
                heads.append(HeadMoments(mean, math.sqrt(var), layer, h))
        found[layer] = heads
        layer += 1
    return found


def _looks_like_attention(module) -> bool:
    from torch import nn

    if isinstance(module, nn.MultiheadAttention):
        return True
    name = type(module).__name__
    return name.endswith(("Attention", "SelfAttention")) and not name.endswith(("FlashAttention2", "SdpaAttention"))


def _matrix_and_bias(pieces):
    """The (d, hidden) weight block and (d,) bias of one head's query or key pieces, as float64."""
    matrix, bias = None, None
    for piece in pieces:
        block = piece.of(piece.param.detach()).double()
        if block.dim() == 2:
            matrix = block.T if piece.dim == 1 else block  # Conv1D keeps (in, out): columns are the head's rows
        else:
            bias = block
    return matrix, bias

