"""Stability regions: a sweep over (temperature, head dimension, sequence length, weight growth).

For each point the hidden size, init std, scale rule and mitigations of the checked config are
kept; the head count becomes hidden / head_dim. Each point gets a verdict per format and seed
001's curvature (within the format's precision or not), and each (temperature, head dim, length)
the largest weight growth each format survives: the boundary of the region.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from attnkit.check.curvature import curvature
from attnkit.check.dtypes import FORMATS
from attnkit.check.estimate import estimate
from attnkit.check.recommend import max_safe_growth
from attnkit.check.safety import judge
from attnkit.check.shape import AttentionShape, LayerType

TEMPERATURES = (0.5, 1.0, 2.0)
HEAD_DIMS = (32, 64, 128, 256)
SEQ_LENS = (512, 2048, 8192, 32768, 131072)
GROWTHS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
REGION_DTYPES = ("fp16", "bf16")


@dataclass
class RegionPoint:
    temperature: float
    head_dim: int
    heads: int
    seq_len: int
    growth: float
    status: dict[str, str]  # dtype -> safe/marginal/unsafe
    largest_logit: float
    log10_curvature: float
    curvature_within: dict[str, bool]


@dataclass
class RegionBoundary:
    temperature: float
    head_dim: int
    heads: int
    seq_len: int
    max_growth: dict[str, float]  # dtype -> largest safe weight growth (inf: any)


@dataclass
class RegionSweep:
    base: str  # what was kept from the checked config
    points: list[RegionPoint] = field(default_factory=list)
    boundaries: list[RegionBoundary] = field(default_factory=list)
    temperatures: tuple[float, ...] = TEMPERATURES
    head_dims: tuple[int, ...] = HEAD_DIMS
    seq_lens: tuple[int, ...] = SEQ_LENS
    growths: tuple[float, ...] = GROWTHS

    def to_dict(self) -> dict:
        def fin(x):
            return "inf" if x == math.inf else x

        return {
            "base": self.base, "temperatures": list(self.temperatures), "head_dims": list(self.head_dims),
            "seq_lens": list(self.seq_lens), "growths": list(self.growths),
            "boundaries": [{**asdict(b), "max_growth": {k: fin(v) for k, v in b.max_growth.items()}} for b in self.boundaries],
            "points": [asdict(p) for p in self.points],
        }


def _variant(shape: AttentionShape, head_dim: int) -> AttentionShape | None:
    if head_dim > shape.hidden_size or shape.hidden_size % head_dim:
        return None
    heads = shape.hidden_size // head_dim
    if shape.scale_source.startswith("1/sqrt(d)"):
        scale = 1 / math.sqrt(head_dim)
    elif shape.scale_source.startswith("1/d"):
        scale = 1 / head_dim
    else:  # a fixed scale from the config (scaling, query_pre_attn_scalar, attention_multiplier) stays
        scale = shape.scale
    group = max(1, shape.num_heads // shape.num_kv_heads)
    return shape.with_changes(head_dim=head_dim, num_heads=heads, num_kv_heads=max(1, heads // group), scale=scale)


def sweep(shape: AttentionShape, layer_type: LayerType | None = None, upcast: bool = False,
          temperatures=TEMPERATURES, head_dims=HEAD_DIMS, seq_lens=SEQ_LENS, growths=GROWTHS) -> RegionSweep:
    layer_type = layer_type or LayerType("full_attention", shape.num_layers)
    result = RegionSweep(
        base=f"hidden {shape.hidden_size}, {shape.num_layers} layers, init std {shape.init_std:g}, scale rule "
             f"{shape.scale_source.split(' =')[0]}" + (f", soft-cap {shape.softcap:g}" if shape.softcap else "")
             + (", QK-norm" if shape.qk_norm else ""),
        temperatures=tuple(temperatures), head_dims=tuple(head_dims), seq_lens=tuple(seq_lens), growths=tuple(growths))
    for tau in temperatures:
        for d in head_dims:
            variant = _variant(shape, d)
            if variant is None:
                continue
            for T in seq_lens:
                result.boundaries.append(RegionBoundary(tau, d, variant.num_heads, T, {
                    dt: max_safe_growth(variant, T, layer_type, dt, tau, upcast=upcast) for dt in REGION_DTYPES}))
                for x in growths:
                    e = estimate(variant, T, layer_type, tau, x)
                    c = curvature(e, d)
                    result.points.append(RegionPoint(
                        tau, d, variant.num_heads, T, x,
                        {dt: judge(e, dt, upcast).status for dt in REGION_DTYPES}, e.model_max, c.log10_kappa,
                        {dt: c.within(FORMATS[dt]) for dt in REGION_DTYPES}))
    return result
