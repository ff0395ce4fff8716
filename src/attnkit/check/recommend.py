"""Concrete changes, each with the number that triggered it.

For each unsafe or marginal finding in the dtype asked about, the changes that would fix it and by
how much: fp32 attention, temperature, soft-capping, QK-norm, more heads of a smaller dimension
(which lowers |q.k| before scaling by sqrt(d_old/d_new), though not the scaled logit at 1/sqrt(d)),
a shorter sequence (the maximum falls only like sqrt(2 ln n), so it seldom suffices), a smaller
init std (logits scale with sigma^2). Recommendations are computed by re-running the estimate
with the change, never from a rule of thumb.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from attnkit.check.dtypes import DISTORTION_TOLERANCE, FORMATS
from attnkit.check.estimate import LogitEstimate, estimate
from attnkit.check.safety import SAFE, Verdict, judge
from attnkit.check.shape import AttentionShape, LayerType


@dataclass
class Recommendation:
    change: str  # "fp32_softmax", "temperature", "softcap", "qk_norm", "heads", "seq_len", "init_std", "dtype"
    message: str
    trigger: str  # the finding and its number
    value: float | None = None  # the suggested setting
    fixes: bool = True  # False: the change helps or is often suggested, but the estimate says it is not enough alone

    def to_dict(self) -> dict:
        return asdict(self)


def recommend(shape: AttentionShape, est: LogitEstimate, verdict: Verdict, layer_type: LayerType,
              moments=None, upcast: bool = False) -> list[Recommendation]:
    out: list[Recommendation] = []
    fmt = FORMATS[verdict.dtype]
    bad = [f for f in verdict.findings if f.severity not in (SAFE, "advice")]
    if not bad:
        return out

    def safe_with(changed: AttentionShape, **kw) -> tuple[bool, LogitEstimate]:
        args = dict(seq_len=est.seq_len, layer_type=layer_type, temperature=est.temperature, growth=est.growth,
                    moments=moments)
        args.update(kw)
        e = estimate(changed, **args)
        return judge(e, verdict.dtype, upcast).status == SAFE, e

    for finding in bad:
        trigger = f"{finding.type}: {finding.message}"
        if not upcast and verdict.dtype != "fp32":
            out.append(Recommendation(
                "fp32_softmax", "compute QK^T and the softmax in fp32 (upcast attention, e.g. GPT-2's "
                "reorder_and_upcast_attn, or an fp32 attention kernel); the rest of the model may stay in "
                f"{fmt.name}", trigger))
        if finding.type == "rounding":
            tolerated = fmt.largest_tolerated_logit(DISTORTION_TOLERANCE)
            tau = est.temperature * est.model_max_high / (tolerated * 0.99)
            ok, e = safe_with(shape, temperature=tau)
            if ok:
                out.append(Recommendation("temperature", f"divide logits by a temperature of {tau:.3g} (largest logit "
                                          f"{est.model_max_high:.3g} -> {e.model_max_high:.3g}, below {fmt.name}'s {tolerated:.3g})",
                                          trigger, tau))
            cap = tolerated * 0.99
            if not shape.softcap or shape.softcap > cap:
                ok, e = safe_with(shape.with_changes(softcap=cap))
                if ok:
                    out.append(Recommendation("softcap", f"soft-cap logits at {cap:.3g} (attn_logit_softcapping; "
                                              f"Gemma 2 uses 50, which {fmt.name} rounds by up to "
                                              f"{100 * fmt.distortion(50):.0f} %)", trigger, cap))
            if not shape.qk_norm:
                ok, e = safe_with(shape.with_changes(qk_norm=True))
                out.append(Recommendation("qk_norm", f"add QK-norm (OLMo 2, ViT-22B): bounds |logit| at scale*d*g^2 = "
                                          f"{shape.scale / est.temperature * shape.head_dim:.3g}*g^2 with learned gains g; the estimate "
                                          f"becomes {e.model_max:.3g}" + ("" if ok else " (not enough alone here)"), trigger,
                                          fixes=ok))
            _shorter_sequence(out, shape, est, layer_type, moments, verdict, upcast, trigger)
            _head_split(out, shape, est, layer_type, verdict, upcast, trigger)
            if moments is None and not shape.qk_norm:
                # logits scale with sigma^2: the init std that brings the 99 % logit under the limit
                std = shape.init_std * math.sqrt(tolerated * 0.99 / est.model_max_high)
                ok, e = safe_with(shape.with_changes(init_std=std))
                if ok:
                    out.append(Recommendation("init_std", f"initialise W_q/W_k with std {std:.3g} instead of "
                                              f"{shape.init_std:g} (logits scale with std^2: largest {e.model_max_high:.3g}); "
                                              f"training growth then starts from there", trigger, std))
        if finding.type == "qk_overflow":
            if shape.head_dim >= 32:
                for d in (shape.head_dim // 2, shape.head_dim // 4):
                    if d < 16 or shape.hidden_size % d:
                        continue
                    changed = shape.with_changes(head_dim=d, num_heads=shape.hidden_size // d,
                                                 num_kv_heads=max(1, shape.num_kv_heads * shape.head_dim // d),
                                                 scale=1 / math.sqrt(d) if shape.scale_source.startswith("1/sqrt(d)") else
                                                 1 / d if shape.scale_source.startswith("1/d") else shape.scale)
                    ok, e = safe_with(changed, moments=None)
                    out.append(Recommendation(
                        "heads", f"{shape.hidden_size // d} heads of {d} dims instead of {shape.num_heads} of {shape.head_dim}: "
                        f"|q.k| before scaling falls by sqrt({shape.head_dim}/{d}) to ~{e.raw_absmax:,.0f}"
                        + ("" if ok else " (not enough alone)"), trigger, float(d), fixes=ok))
                    if ok:
                        break
            if not shape.qk_norm:
                ok, e = safe_with(shape.with_changes(qk_norm=True))
                out.append(Recommendation("qk_norm", f"add QK-norm: |q.k| <= d*g^2 = {shape.head_dim}*g^2, far below 65,504",
                                          trigger, fixes=ok))
            out.append(Recommendation("dtype", "train in bf16: fp32's range, so QK^T cannot overflow (mind its rounding)",
                                      trigger))
    # One line per change: the first trigger is enough.
    seen: set[str] = set()
    unique = []
    for r in out:
        if r.change not in seen:
            seen.add(r.change)
            unique.append(r)
    return unique


def _head_split(out, shape, est, layer_type, verdict, upcast, trigger) -> None:
    """What more, narrower heads would do ("try 32 heads or 256-dim")."""
    d = shape.head_dim // 2
    if d < 8 or shape.hidden_size % d:
        return
    changed = shape.with_changes(
        head_dim=d, num_heads=shape.hidden_size // d, num_kv_heads=max(1, shape.num_kv_heads * 2),
        scale=1 / math.sqrt(d) if shape.scale_source.startswith("1/sqrt(d)") else
        1 / d if shape.scale_source.startswith("1/d") else shape.scale)
    e = estimate(changed, est.seq_len, layer_type, est.temperature, est.growth)
    base = estimate(shape, est.seq_len, layer_type, est.temperature, est.growth)  # both at init, like for like
    base_safe = judge(base, verdict.dtype, upcast).status == SAFE
    # A fix only where the shape itself is the problem: unsafe at init as it is, safe at init split.
    ok = not base_safe and judge(e, verdict.dtype, upcast).status == SAFE
    if shape.scale_source.startswith("1/sqrt(d)"):
        why = (f"at 1/sqrt(d) the logit std at init is hidden*std^2 = {shape.hidden_size * shape.init_std ** 2:.3g} "
               f"whatever d, so the largest logit only moves from {base.model_max:.3g} to {e.model_max:.3g} "
               f"(more logits to take the maximum over)")
    else:
        why = f"with this scale rule the largest logit at init moves from {base.model_max:.3g} to {e.model_max:.3g}"
    if ok:
        verdict_text = "would fix it: "
    elif base_safe:
        verdict_text = (f"is not a fix: both shapes are {verdict.dtype}-safe at initialisation, so the large logits "
                        f"come from the weights, not the head shape; ")
    else:
        verdict_text = "does not fix rounding: "
    out.append(Recommendation("heads", f"{changed.num_heads} heads of {d} dims instead of {shape.num_heads} of "
                              f"{shape.head_dim} " + verdict_text + why, trigger, float(d), fixes=ok))


def _shorter_sequence(out, shape, est, layer_type, moments, verdict, upcast, trigger) -> None:
    length = est.seq_len
    while length > 16:
        length //= 2
        e = estimate(shape, length, layer_type, est.temperature, est.growth, moments)
        if judge(e, verdict.dtype, upcast).status == SAFE:
            out.append(Recommendation("seq_len", f"sequences of {length} tokens instead of {est.seq_len}: the largest "
                                      f"logit falls only like sqrt(2 ln n), to {e.model_max_high:.3g}", trigger, float(length)))
            return
    out.append(Recommendation("seq_len", f"a shorter sequence does not help enough: even at 16 tokens the largest logit is "
                              f"~{estimate(shape, 16, layer_type, est.temperature, est.growth, moments).model_max:.3g}",
                              trigger, None, fixes=False))


def max_safe_growth(shape: AttentionShape, seq_len: int, layer_type: LayerType, dtype: str, temperature: float = 1.0,
                    moments=None, upcast: bool = False, highest: float = 1e4) -> float:
    """The largest weight growth X (logits x X^2) that keeps ``dtype`` safe; inf beyond ``highest``, 0 if not even X->0."""
    def ok(x: float) -> bool:
        return judge(estimate(shape, seq_len, layer_type, temperature, x, moments), dtype, upcast).status == SAFE

    if ok(highest):
        return math.inf
    lo, hi = 1e-3, highest
    if not ok(lo):
        return 0.0
    for _ in range(40):  # bisection in log space: 1e-3..1e4 to ~0.1 %
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.001:
            break
    return lo
