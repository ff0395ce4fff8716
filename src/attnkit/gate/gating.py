"""Gated attention on any model attnkit knows the layout of: Y' = Y ⊙ σ(gate(X)) before W_O.

Qiu et al. 2025 (arXiv 2505.06708), gate "G1": right after SDPA and before the output
projection, Y' = Y ⊙ σ(X W_θ + b), X the layer's normalised input hidden states, one gate per
head (``headwise``) or per element (``elementwise``); a per-head MLP gate (``mlp``, as in the TransformerAE collapse study:
Linear → ReLU → Linear → sigmoid). Gate kinds are entries of ``GATE_KINDS``.

    from attnkit.gate import add_gates, save_gates, load_gates, GateStats
    add_gates(model, "headwise")                 # the model computes exactly what it did
    ...train...                                  # the gates are model parameters now
    with GateStats(model) as gs:                 # mean gate per head, share of gates below 0.1
        model(ids)
    gs.heads()
    save_gates(model, "gates/")                  # gates.safetensors + gate_config.json, nothing else
    load_gates(fresh_model, "gates/")            # the same outputs

Identity at initialisation: the gate's last Linear has weight 0 and bias b (``init_bias``), so
σ(gate(X)) = σ(b) for every input; the gate's output is multiplied by a constant 1/σ(b) (a
buffer, equivalent to rescaling W_O's input columns by 1/σ(b), but leaving the model's own
weights untouched so the gates save and load on their own). With b = 0 (the default) that is
0.5 × 2 = 1 exactly: a converted model's outputs are bit for bit the original's.

The hidden states: the HF attention function never receives them, so a forward pre-hook on the
attention module keeps its input X and a forward pre-hook on the output projection applies the
gate (where each family keeps them: ``attnkit.seam.layouts``). Gate modules are registered as submodules of their attention
module (``attnkit_gate``), so ``model.parameters()``, ``.to()`` and optimizers see them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit.seam.layouts import OutputLayout, output_layouts
from attnkit.errors import UserError

GATE_ATTR = "attnkit_gate"
LOW_GATE = 0.1  # "share below 0.1": the paper's gates are sparse (mean ≈ 0.12 at 15B)


# --- gate kinds: X (B, T, hidden) -> logits (B, T, G), G = heads or heads * head_dim ------------

@dataclass(frozen=True)
class GateKind:
    name: str
    per_element: bool  # one gate per element of a head (G = H·d) or per head (G = H)
    build: Callable[[int, int], nn.Module]  # (hidden, G) -> module; its last Linear is ``.out``


class _Linear(nn.Module):
    def __init__(self, hidden: int, g: int):
        super().__init__()
        self.out = nn.Linear(hidden, g)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x)


class _MLP(nn.Module):
    """The MLP gate: Linear(hidden, hidden/2) → ReLU → Linear(hidden/2, heads) (→ sigmoid outside)."""

    def __init__(self, hidden: int, g: int):
        super().__init__()
        self.inner = nn.Linear(hidden, max(1, hidden // 2))
        self.out = nn.Linear(max(1, hidden // 2), g)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.inner(x)))


GATE_KINDS: dict[str, GateKind] = {
    "headwise": GateKind("headwise", False, _Linear),
    "elementwise": GateKind("elementwise", True, _Linear),
    "mlp": GateKind("mlp", False, _MLP),
}


def gate_kind(name: str) -> GateKind:
    if name not in GATE_KINDS:
        raise UserError(f"unknown gate kind '{name}' (known: {', '.join(GATE_KINDS)})")
    return GATE_KINDS[name]


# --- the gate module ---------------------------------------------------------------------------

class AttentionGate(nn.Module):
    """One layer's gate. ``forward(x, y)``: x (B, T, hidden), y (B, T, H·d) -> y ⊙ σ(net(x)) / σ(b₀)."""

    def __init__(self, kind: str, hidden: int, num_heads: int, head_dim: int, init_bias: float = 0.0, layer: int = 0):
        super().__init__()
        spec = gate_kind(kind)
        self.kind, self.hidden, self.num_heads, self.head_dim = kind, hidden, num_heads, head_dim
        self.init_bias, self.layer = float(init_bias), layer
        self.net = spec.build(hidden, num_heads * head_dim if spec.per_element else num_heads)
        nn.init.zeros_(self.net.out.weight)
        nn.init.constant_(self.net.out.bias, self.init_bias)
        self.register_buffer("rescale", torch.tensor(1.0 / _sigmoid(self.init_bias)), persistent=True)
        self.recorders: list[GateStats] = []
        self._x: Tensor | None = None

    def gate(self, x: Tensor) -> Tensor:
        """σ(net(x)): (B, T, G) in [0, 1] — the value the statistics report (before the rescale)."""
        return torch.sigmoid(self.net(x.to(self.net.out.weight.dtype)))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        g = self.gate(x)  # (B, T, G)
        for r in self.recorders:
            r.record(self, g.detach())
        B, T = y.shape[:2]
        scale = (g * self.rescale).to(y.dtype)
        return (y.view(B, T, self.num_heads, -1) * scale.view(B, T, self.num_heads, -1)).view(y.shape)


def _sigmoid(b: float) -> float:
    return 1.0 / (1.0 + math.exp(-b))


# --- hooks -------------------------------------------------------------------------------------

def _keep_x(gate: AttentionGate):
    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(x, Tensor):
            raise RuntimeError(f"{type(module).__name__} was called without hidden states the gate can see")
        gate._x = x
    return hook


def _apply(gate: AttentionGate):
    def hook(module, args):
        x, gate._x = gate._x, None
        if x is None:
            raise RuntimeError("the output projection ran before its attention module: the gate has no X")
        y = args[0]
        if x.shape[:-1] != y.shape[:-1]:  # e.g. BERT's cross attention: X is the query side, as Y
            raise RuntimeError(f"gate input {tuple(x.shape)} and attention output {tuple(y.shape)} disagree")
        return (gate(x, y), *args[1:])
    return hook


_HANDLES = "_attnkit_gate_handles"


def add_gates(model: nn.Module, kind: str = "headwise", *, init_bias: float = 0.0,
              layers: list[int] | None = None) -> list[AttentionGate]:
    """Add a ``kind`` gate to every attention layer of ``model`` (or to ``layers``), in place.

    The converted model computes exactly what it did (see the module docstring). Returns the gates,
    in layer order. A model that has gates already is refused (``remove_gates`` first).
    """
    if find_gates(model):
        raise UserError("the model has attnkit gates already; remove_gates(model) first")
    gate_kind(kind)
    found = gate_layouts(model)
    chosen = range(len(found)) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(found)]
    if bad:
        raise UserError(f"layers {bad} do not exist: the model has {len(found)} gateable attention layers")
    gates = []
    for i in chosen:
        gates.append(_install(found[i], AttentionGate(kind, found[i].hidden, found[i].num_heads, found[i].head_dim,
                                                      init_bias, layer=i)))
    return gates


def gate_layouts(model: nn.Module) -> list[OutputLayout]:
    """Every attention module of ``model`` a gate can go on, in layer order: the output projections
    of the one weight-layout table (``attnkit.seam.layouts``)."""
    return output_layouts(model)


def _install(layout: OutputLayout, gate: AttentionGate) -> AttentionGate:
    ref = next(iter(layout.out_proj.parameters()))
    gate.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
    gate.rescale.data = gate.rescale.data.float()  # the constant stays float32 in any dtype
    layout.x_module.add_module(GATE_ATTR, gate)
    handles = [layout.x_module.register_forward_pre_hook(_keep_x(gate), with_kwargs=True),
               layout.out_proj.register_forward_pre_hook(_apply(gate))]
    setattr(layout.x_module, _HANDLES, handles)
    return gate


def find_gates(model: nn.Module) -> list[AttentionGate]:
    """The gates ``add_gates`` put in ``model``, in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, AttentionGate)), key=lambda g: g.layer)


def remove_gates(model: nn.Module) -> None:
    """Take every gate out again (hooks and submodules): the model is the original one."""
    for m in list(model.modules()):
        if isinstance(getattr(m, GATE_ATTR, None), AttentionGate):
            for h in getattr(m, _HANDLES, []):
                h.remove()
            delattr(m, GATE_ATTR)
            if hasattr(m, _HANDLES):
                delattr(m, _HANDLES)


def gate_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The gates' parameters and buffers, keyed ``layers.{i}.{name}``."""
    out = {}
    for g in find_gates(model):
        for name, t in g.state_dict().items():
            out[f"layers.{g.layer}.{name}"] = t.detach().contiguous()
    return out


# --- statistics --------------------------------------------------------------------------------

def gate_sums(gate: AttentionGate, g: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per head of one forward's gate values g (B, T, G): (sum (H,), count below 0.1 (H,), values
    per head), in float64 over batch, positions and, for elementwise gates, the head's elements."""
    g = g.reshape(-1, gate.num_heads, g.shape[-1] // gate.num_heads).double()  # (N, H, per-head)
    return g.sum(dim=(0, 2)), (g < LOW_GATE).sum(dim=(0, 2)).double(), g.shape[0] * g.shape[2]


class GateStats:
    """Gate values seen while it is on (a context manager): per layer and head, the mean gate and
    the share of gates below 0.1 (over batch, positions and, for elementwise gates, the head's
    elements). Sums are float64 over every forward until ``reset``; nothing per token is kept."""

    def __init__(self, model: nn.Module):
        self.gates = find_gates(model)
        if not self.gates:
            raise UserError("the model has no attnkit gates (add_gates or load_gates first)")
        self.reset()

    def reset(self) -> None:
        self._sum: dict[int, Tensor] = {}
        self._low: dict[int, Tensor] = {}
        self._n: dict[int, int] = {}

    def record(self, gate: AttentionGate, g: Tensor) -> None:
        s, low, n = gate_sums(gate, g)
        if gate.layer in self._sum:
            self._sum[gate.layer] += s
            self._low[gate.layer] += low
            self._n[gate.layer] += n
        else:
            self._sum[gate.layer], self._low[gate.layer], self._n[gate.layer] = s, low, n

    def __enter__(self) -> GateStats:
        for g in self.gates:
            g.recorders.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for g in self.gates:
            if self in g.recorders:
                g.recorders.remove(self)

    def all_reduce(self, group=None) -> None:
        """Sum the gate statistics over the ranks of ``group`` (torch.distributed; every rank must
        call it). A few numbers per head, exchanged as objects: a rank that saw no forward adds nothing."""
        import torch.distributed as dist

        mine = {layer: (self._sum[layer].cpu(), self._low[layer].cpu(), self._n[layer]) for layer in self._sum}
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
        self.reset()
        for sums in everyone:
            for layer, (s, low, n) in sums.items():
                if layer in self._sum:
                    self._sum[layer], self._low[layer] = self._sum[layer] + s, self._low[layer] + low
                    self._n[layer] += n
                else:
                    self._sum[layer], self._low[layer], self._n[layer] = s, low, n

    def heads(self) -> list[dict]:
        """``[{"layer", "head", "kind", "mean_gate", "share_below_0_1", "gates"}]`` for every head seen."""
        out = []
        kinds = {g.layer: g.kind for g in self.gates}
        for layer in sorted(self._sum):
            n = self._n[layer]
            for h, (s, low) in enumerate(zip(self._sum[layer].tolist(), self._low[layer].tolist())):
                out.append({"layer": layer, "head": h, "kind": kinds[layer], "mean_gate": s / n,
                            "share_below_0_1": low / n, "gates": n})
        return out

    def summary(self) -> dict:
        """Over every head: mean gate and share below 0.1 (each head weighted equally)."""
        heads = self.heads()
        if not heads:
            return {"mean_gate": float("nan"), "share_below_0_1": float("nan"), "heads": 0}
        return {"mean_gate": sum(h["mean_gate"] for h in heads) / len(heads),
                "share_below_0_1": sum(h["share_below_0_1"] for h in heads) / len(heads), "heads": len(heads)}
