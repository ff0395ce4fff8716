"""Gate statistics as a seam tap: the attention calls a session observes, and nothing else, report
their layer's gate values under the call's own site (layer, stack, kind).

The gate runs after the attention function (on the output projection's input, ``gating.py``), so
the tap cannot read it from the call; it is told the call (``on_call``: the seam's plan decided
this call is observed — ``every``, ``active``, ``layers``) and the gate of that call's attention
module then records this forward's values into it (``AttentionGate.recorders``). A gate whose
call was not observed records nothing: the statistics follow the session exactly as the
attention statistics do, on the same steps of a monitored run.

    tap = GateTap(model)
    with tap, attach(model, taps=[tap]):
        model(ids)
    tap.heads()   # [{"layer", "stack", "kind", "head", "mean_gate", "share_below_0_1", "gates"}]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.gate.gating import GATE_ATTR, AttentionGate, gate_sums
from attnkit.errors import UserError
from attnkit.seam.call import AttentionCall
from attnkit.seam.sites import Site
from attnkit.seam.taps import Tap


def gate_owners(model: nn.Module) -> dict[int, AttentionGate]:
    """id(module) -> the gate of the attention module it is (or is inside: BERT's ``.self``)."""
    owners: dict[int, AttentionGate] = {}
    for m in model.modules():
        gate = getattr(m, GATE_ATTR, None)
        if isinstance(gate, AttentionGate):
            for sub in m.modules():
                owners.setdefault(id(sub), gate)
    return owners


class GateTap(Tap):
    wants_chunks = False
    wants_call = True

    def __init__(self, model: nn.Module) -> None:
        self.owners = gate_owners(model)
        if not self.owners:
            raise UserError("the model has no attnkit gates (add_gates or load_gates first)")
        self.gates = list({id(g): g for g in self.owners.values()}.values())
        self._pending: dict[int, Site] = {}  # id(gate) -> the observed call's site, until the gate runs
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    def install(self) -> "GateTap":
        for g in self.gates:
            if self not in g.recorders:
                g.recorders.append(self)
        return self

    def remove(self) -> None:
        for g in self.gates:
            if self in g.recorders:
                g.recorders.remove(self)
        self._pending.clear()

    def __enter__(self) -> "GateTap":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ seam side
    def start_forward(self) -> None:
        self._pending.clear()  # a forward whose gate never ran (an exception) leaves nothing behind

    def on_call(self, call: AttentionCall) -> None:
        gate = self.owners.get(id(call.module))
        if gate is not None:
            self._pending[id(gate)] = call.site

    # ------------------------------------------------------------------ gate side
    def record(self, gate: AttentionGate, g: Tensor) -> None:
        site = self._pending.pop(id(gate), None)
        if site is None:
            return  # this call was not observed
        s, low, count = gate_sums(gate, g)
        n = torch.full_like(s, float(count))  # a tensor, so all_reduce sums it with the rest
        if site in self._sum:
            self._sum[site] += s
            self._low[site] += low
            self._n[site] += n
        else:
            self._sum[site], self._low[site], self._n[site] = s, low, n
            self._kind[site] = gate.kind

    # ------------------------------------------------------------------ results
    def reset(self) -> None:
        self._sum: dict[Site, Tensor] = {}  # (H,) float64 sums of gate values
        self._low: dict[Site, Tensor] = {}  # (H,) counts below LOW_GATE
        self._n: dict[Site, Tensor] = {}  # (H,) gate values seen
        self._kind: dict[Site, str] = {}

    def all_reduce(self) -> None:
        """Sum the statistics over ``torch.distributed`` ranks (every rank must call it; every rank
        must have observed the same sites, as with ``StatsCollector.all_reduce``)."""
        import torch.distributed as dist

        for site in sorted(self._sum):
            for d in (self._sum, self._low, self._n):
                dist.all_reduce(d[site])

    def heads(self) -> list[dict]:
        out = []
        for site in sorted(self._sum):
            sums, lows, ns = self._sum[site].tolist(), self._low[site].tolist(), self._n[site].tolist()
            for h, (s, low, n) in enumerate(zip(sums, lows, ns)):
                out.append({"layer": site.layer, "stack": site.stack, "kind": site.kind, "head": h,
                            "gate_kind": self._kind[site], "mean_gate": s / n, "share_below_0_1": low / n,
                            "gates": int(n)})
        return out


__all__ = ["GateTap", "gate_owners"]
