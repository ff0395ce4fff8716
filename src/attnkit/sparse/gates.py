"""Trainable block gates (SeerAttention-style), one per attention site, living beside the model.

    gates = make_gates(model, SparseConfig(pattern="learned_gate", density=0.25))
    optimizer = torch.optim.AdamW(gates.parameters(), lr=1e-3)
    with sparse_attention(model, cfg, gates=gates):
        loss = ...; loss.backward()          # gradients reach the gates (see block_attention)

``make_gates`` asks the seam for the model's attention sites and their shapes (one probe forward
of two tokens, observed by a tap, in eval mode without gradients; the model is left as found):
no module of the model is read by name, and the model itself is never changed. ``SparseGates``
is an ``nn.Module`` of its own (``state_dict`` / ``load_state_dict`` / ``.to()`` as usual).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.errors import UserError
from attnkit.seam import AttentionSession, observe_forward
from attnkit.seam.sites import Site
from attnkit.seam.taps import Tap
from attnkit.sparse.patterns import get_pattern


class BlockGate(nn.Module):
    """One site's gate: a score per (query block, key block) for each KV group.

    forward(query_means (B, Hkv, G, nQb, D), key_stats (B, Hkv, nKb, 3·D)) -> (B, Hkv, nQb, nKb):
    the group's pooled queries (concatenated over its G heads) and each key block's (max, min,
    mean) projected to ``gate_dim`` per KV head; score = ⟨q', k'⟩ / √gate_dim. The query
    projection starts at zero, so a new gate scores every block alike (uniform); ``init_moba``
    sets it to MoBA's score instead.
    """

    def __init__(self, num_kv_heads: int, groups: int, head_dim: int, gate_dim: int = 32) -> None:
        super().__init__()
        self.num_kv_heads, self.groups, self.head_dim, self.gate_dim = num_kv_heads, groups, head_dim, gate_dim
        self.q_weight = nn.Parameter(torch.zeros(num_kv_heads, groups * head_dim, gate_dim))
        self.q_bias = nn.Parameter(torch.zeros(num_kv_heads, 1, gate_dim))
        bound = 1.0 / math.sqrt(3 * head_dim)  # nn.Linear's default scale for the key side
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, 3 * head_dim, gate_dim).uniform_(-bound, bound))
        self.k_bias = nn.Parameter(torch.zeros(num_kv_heads, 1, gate_dim))

    @torch.no_grad()
    def init_moba(self) -> "BlockGate":
        """Start from MoBA: q' = Σ over the group's heads of the pooled query, k' = the block's mean
        key, so the score is MoBA's ⟨Σ_g q̄_g, k̄⟩ / √gate_dim (needs gate_dim >= head_dim)."""
        D, G = self.head_dim, self.groups
        if self.gate_dim < D:
            raise UserError(f"gate_init='moba' needs gate_dim >= head_dim ({D}), got {self.gate_dim}")
        eye = torch.eye(D, self.gate_dim, dtype=self.q_weight.dtype, device=self.q_weight.device)
        self.q_weight.copy_(eye.repeat(G, 1).expand(self.num_kv_heads, -1, -1))
        self.k_weight.zero_()
        self.k_weight[:, 2 * D:] = eye  # key stats are (max, min, mean): the mean is the third part
        self.q_bias.zero_()
        self.k_bias.zero_()
        return self

    def forward(self, query_means: Tensor, key_stats: Tensor) -> Tensor:
        B, Hk, G, nQ, D = query_means.shape
        dtype = self.q_weight.dtype
        q = query_means.to(dtype).permute(0, 1, 3, 2, 4).reshape(B, Hk, nQ, G * D)  # (B, Hkv, nQb, G·D)
        q = torch.matmul(q, self.q_weight) + self.q_bias  # (B, Hkv, nQb, dg)
        k = torch.matmul(key_stats.to(dtype), self.k_weight) + self.k_bias  # (B, Hkv, nKb, dg)
        return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.gate_dim)


def site_key(site: Site) -> str:
    """A module-name-safe key of a site: ``"3"``, ``"decoder.3.cross"``."""
    parts = [p.replace(" ", "_").replace(".", "_") for p in (site.stack,) if p] + [str(site.layer)]
    if site.kind != "self":
        parts.append(site.kind)
    return ".".join(parts).replace(".", "__")


class SparseGates(nn.Module):
    """Every site's ``BlockGate`` (``gates[site]``), with the config they were made for."""

    def __init__(self, shapes: dict[Site, tuple[int, int, int]], gate_dim: int) -> None:
        super().__init__()
        self.sites = sorted(shapes)
        self.gate_dim = gate_dim
        self.gates = nn.ModuleDict({site_key(s): BlockGate(*shapes[s], gate_dim=gate_dim) for s in self.sites})

    def __getitem__(self, site: Site) -> BlockGate:
        key = site_key(site)
        if key not in self.gates:
            raise KeyError(f"no gate for {site}: the gates were made for {', '.join(map(str, self.sites))}")
        return self.gates[key]

    def __contains__(self, site: Site) -> bool:
        return site_key(site) in self.gates

    def __len__(self) -> int:
        return len(self.sites)


def attention_shapes(model: nn.Module, example: dict | None = None) -> dict[Site, tuple[int, int, int]]:
    """{site: (KV heads, query heads per KV head, head dim)} of every attention call of ``model``,
    from one probe forward through the seam (``example``: the forward's keyword arguments;
    default two tokens of ``input_ids``)."""
    class _Shapes(Tap):
        wants_call = True
        wants_chunks = False

        def __init__(self) -> None:
            self.shapes: dict[Site, tuple[int, int, int]] = {}

        def on_call(self, call) -> None:
            groups = call.kv_groups
            self.shapes[call.site] = (call.num_heads // groups, groups, call.query.shape[-1])

    tap = _Shapes()
    if example is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        example = {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device)}
    observe_forward(model, AttentionSession(taps=[tap]), **example)
    return tap.shapes


def make_gates(model: nn.Module, cfg, example: dict | None = None) -> SparseGates | None:
    """A ``SparseGates`` for every attention site of ``model`` when ``cfg.pattern`` is learned,
    else None. On the device and in the dtype of the model's first parameter (float32 at least)."""
    if not get_pattern(cfg.pattern).learned:
        return None
    shapes = attention_shapes(model, example)
    gates = SparseGates(shapes, cfg.gate_dim)
    if cfg.gate_init == "moba":
        for gate in gates.gates.values():
            gate.init_moba()
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        gates.to(device=ref.device, dtype=dtype)
    return gates
