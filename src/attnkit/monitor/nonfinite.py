"""The NaN/Inf tracer: re-run a batch observed and name where non-finite values first appear.

    result = trace_nonfinite(model, (input_ids,), {})
    print(result.message)   # "NaN/Inf first in layer 2 head 3: logits non-finite although q and k are
                            #  finite (|q·k| up to 3.4e38: the dot product overflowed) ..."

One forward under ``no_grad`` through the seam with a statistics tap (which keeps each site's
non-finite logit count and the order in which sites ran) and a tap that checks each call's query,
key and value. The first site in call order with non-finite logits — or with a non-finite query,
key or value — is where they appear; whether q/k were already non-finite says if the trouble
comes from before the attention (the weights or activations upstream) or from the logits
themselves. Non-finite parameters are named too (by their path, for the report only). The
``AttentionMonitor`` calls it on a non-finite loss or logits, with the last batch it saw;
``attnkit monitor trace CHECKPOINT`` runs it on a saved model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from attnkit.common.findings import Finding
from attnkit.seam import AttentionCall, Site, StatsCollector, Tap, attach


class _CallCheck(Tap):
    wants_chunks = False
    wants_call = True

    def __init__(self) -> None:
        self.order: list[Site] = []
        self.bad_inputs: dict[Site, list[str]] = {}
        self.absmax: dict[Site, tuple[float, float]] = {}

    def on_call(self, call: AttentionCall) -> None:
        if call.site in self.absmax:
            return
        self.order.append(call.site)
        with torch.no_grad():
            self.bad_inputs[call.site] = [n for n, t in (("query", call.query), ("key", call.key), ("value", call.value))
                                          if not torch.isfinite(t).all()]
            q, k = call.query.detach().float().abs(), call.key.detach().float().abs()
            self.absmax[call.site] = (float(q.nan_to_num(nan=0.0).max()), float(k.nan_to_num(nan=0.0).max()))


@dataclass
class TraceResult:
    step: int | None
    site: Site | None  # the first site where non-finite values appear (None: attention is finite)
    heads: list[int] = field(default_factory=list)
    cause: str = ""  # "inputs" (q/k/v already non-finite) | "logits" | "none"
    bad_inputs: list[str] = field(default_factory=list)
    qk_absmax: float = math.nan  # largest |q.k| of the site's heads (before scaling)
    last_logit_max: float = math.nan  # the head's max logit at the last observed step before
    nonfinite_params: list[str] = field(default_factory=list)
    output_finite: bool = True
    message: str = ""

    def issue(self) -> Finding:
        return Finding("nonfinite_trace", "error", step=self.step if self.step is not None else -1, value=self.qk_absmax,
                       threshold=math.nan, message=self.message, site=self.site, head=self.heads[0] if self.heads else None)


def _finite_output(out) -> bool:
    tensors = [out] if isinstance(out, torch.Tensor) else [v for v in getattr(out, "values", lambda: [])()
                                                            if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def trace_nonfinite(model: nn.Module, args: tuple = (), kwargs: dict | None = None, step: int | None = None,
                    monitor=None) -> TraceResult:
    """Re-run ``model(*args, **kwargs)`` observed and name the first site/head with NaN/Inf."""
    stats, check = StatsCollector(), _CallCheck()
    with torch.no_grad(), attach(model, taps=[stats, check]):
        out = model(*args, **(kwargs or {}))
    bad_params = [n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    by_site = {}
    for h in stats.heads():
        by_site.setdefault(Site(h["layer"], h["stack"], h["kind"]), []).append(h)
    result = TraceResult(step, None, nonfinite_params=bad_params, output_finite=_finite_output(out), cause="none")
    for site in check.order:
        heads = by_site.get(site, [])
        bad_heads = [h["head"] for h in heads if h["nonfinite_logits"] > 0]
        if bad_heads or check.bad_inputs.get(site):
            result.site, result.heads = site, bad_heads
            result.bad_inputs = check.bad_inputs.get(site, [])
            result.cause = "inputs" if result.bad_inputs else "logits"
            finite = [h["qk_absmax"] for h in heads if math.isfinite(h["qk_absmax"])]
            result.qk_absmax = max(finite) if finite else math.inf
            if monitor is not None and bad_heads:
                result.last_logit_max = monitor.last_value("logit_max", site, bad_heads[0])
            break
    result.message = _message(result, check)
    return result


def _message(r: TraceResult, check: _CallCheck) -> str:
    if r.site is None:
        tail = "" if r.output_finite else "; the output is non-finite: it comes from outside attention"
        return "attention is finite everywhere on this batch" + tail + (
            f"; non-finite parameters: {', '.join(r.nonfinite_params[:5])}" if r.nonfinite_params else "")
    where = f"{r.site}" + (f" head {', '.join(map(str, r.heads[:8]))}" if r.heads else "")
    if r.cause == "inputs":
        text = f"NaN/Inf first in {where}: its {'/'.join(r.bad_inputs)} already non-finite (from before the attention)"
    else:
        qmax, kmax = check.absmax.get(r.site, (math.nan, math.nan))
        text = (f"NaN/Inf first in {where}: logits non-finite although q and k are finite "
                f"(|q| up to {qmax:.3g}, |k| up to {kmax:.3g}: softmax/dot-product overflow)")
    if math.isfinite(r.last_logit_max):
        text += f"; its max logit was {r.last_logit_max:.1f} at the last observed step"
    if r.nonfinite_params:
        more = f" (+{len(r.nonfinite_params) - 5} more)" if len(r.nonfinite_params) > 5 else ""
        text += f"; non-finite parameters: {', '.join(r.nonfinite_params[:5])}{more}"
    return text
