"""``SparseConfig``: which blocks each query block keeps, and how the kept blocks are computed.

    cfg = SparseConfig(pattern="moba", density=0.25, block_size=64)

Density is the knob: the share of a query block's candidate key blocks it keeps (the causal
ones, for a causal model). Every pattern keeps the same number ``k`` of blocks at a density, so
patterns compare at equal cost; a pattern only decides *which* blocks. Blocks a pattern always
keeps (the local block, and for some the first "sink" blocks) count towards ``k``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from attnkit.errors import UserError

KERNEL_CHOICES = ("auto", "paged_cpu", "paged_decode", "flex", "split_sdpa", "gather_sdpa", "portable")  # "auto" and ``BLOCK_KERNELS``
GATE_GRADS = ("prior", "straight_through")
GATE_INITS = ("uniform", "moba")


@dataclass(frozen=True)
class SparseConfig:
    """pattern: a name in ``attnkit.sparse.PATTERNS``.
    density: share of the candidate key blocks each query block keeps, in (0, 1]; 1.0 = dense.
    block_size: tokens per query block and per key block.
    sink_blocks: how many leading key blocks a sink-keeping pattern always keeps (StreamingLLM).
    local_blocks: how many key blocks ending at the query's own block are always kept.
    sinks: None = the pattern's own choice (see ``Pattern.sinks``); True / False to override.
    causal: None = from each call (its causal flag, or a mask that hides every future key);
        True / False to say so (False: every key block is a candidate, as in BERT/MiniLM).
    kernel: "auto" (the first that can run a call: a decoding step's paged kernel — in C++ on the CPU
        where it builds —, FlexAttention on CUDA,
        SDPA's fused kernel on the kept blocks on the CPU — split_sdpa for causal calls, gather_sdpa
        otherwise —, else the portable gather kernel), or one of them: "paged_cpu", "paged_decode", "flex",
        "split_sdpa", "gather_sdpa", "portable".
    checkpoint: recompute each query chunk in backward (only the chunk's inputs are kept), as the
        seam's dense kernel does; False keeps the chunk's block logits (still O(T·k·block)).
    chunk_elements: about how many attention scores one query chunk computes at once.
    gate_dim: width of the learned gate's query/key projections.
    gate_bias: weight of the gate's log-probability added to each kept block's scores, which
        gives the gate a gradient from the model's loss (0 = selection only; see ``block_attention``).
    gate_grad: "prior" (the term is added: a trained gate also reweights its kept blocks) or
        "straight_through" (its value is taken away again, its gradient kept: the output is exactly
        attention over the kept blocks for any gate, and density 1 is dense; the gate's gradient is
        the prior's at zero weight).
    gate_init: "uniform" (a new gate scores every block alike: it keeps what sinks_window keeps) or
        "moba" (it starts as MoBA's score, sinks still forced; needs gate_dim >= head_dim; with
        gate_grad="prior" that start also reweights the kept blocks).
    layer_shares: None (every layer at ``density``) or one factor per layer: layer i keeps
        min(1, density · layer_shares[i]) of its blocks. Layers differ in what a dropped block costs
        (a layer of induction heads needs many blocks, a layer of local heads few); shares that
        average 1 move the budget between layers at about the same total cost
        (``attnkit.sparse.distill.calibrate_layer_shares`` measures them).
    """

    pattern: str = "sinks_window"
    density: float = 0.25
    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1
    sinks: bool | None = None
    causal: bool | None = None
    kernel: str = "auto"
    checkpoint: bool = True
    chunk_elements: int = 1 << 21
    gate_dim: int = 32
    gate_bias: float = 1.0
    gate_grad: str = "prior"
    gate_init: str = "uniform"
    layer_shares: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        from attnkit.sparse.patterns import PATTERNS

        if self.pattern not in PATTERNS:
            raise UserError(f"unknown sparse pattern '{self.pattern}' (known: {', '.join(PATTERNS)})")
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0 and math.isfinite(self.density)):
            raise UserError(f"density must be in (0, 1], got {self.density!r}")
        if int(self.block_size) != self.block_size or self.block_size < 1:
            raise UserError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.sink_blocks < 0 or self.local_blocks < 1:
            raise UserError("sink_blocks must be >= 0 and local_blocks >= 1")
        if self.kernel not in KERNEL_CHOICES:
            raise UserError(f"unknown sparse kernel '{self.kernel}' (known: {', '.join(KERNEL_CHOICES)})")
        if self.gate_grad not in GATE_GRADS:
            raise UserError(f"unknown gate_grad '{self.gate_grad}' (known: {', '.join(GATE_GRADS)})")
        if self.gate_init not in GATE_INITS:
            raise UserError(f"unknown gate_init '{self.gate_init}' (known: {', '.join(GATE_INITS)})")
        if self.chunk_elements < 1 or self.gate_dim < 1:
            raise UserError("chunk_elements and gate_dim must be >= 1")
        if self.layer_shares is not None:
            shares = tuple(self.layer_shares)  # a JSON list comes back as a tuple
            if not shares or not all(isinstance(x, (int, float)) and x > 0 and math.isfinite(x) for x in shares):
                raise UserError(f"layer_shares must be positive numbers, one per layer, got {self.layer_shares!r}")
            object.__setattr__(self, "layer_shares", tuple(float(x) for x in shares))

    def density_of_layer(self, layer: int) -> float:
        """The density layer ``layer`` runs at: ``density``, or ``density · layer_shares[layer]`` (at most 1)."""
        if self.layer_shares is None:
            return self.density
        if not 0 <= layer < len(self.layer_shares):
            raise UserError(f"layer_shares has {len(self.layer_shares)} entries: none for layer {layer}")
        return min(1.0, self.density * self.layer_shares[layer])

    def at_layer(self, layer: int) -> "SparseConfig":
        """This config with the density of ``layer`` (itself when every layer runs at ``density``)."""
        if self.layer_shares is None:
            return self
        return replace(self, density=self.density_of_layer(layer), layer_shares=None)

    @property
    def keeps_sinks(self) -> bool:
        from attnkit.sparse.patterns import PATTERNS

        return PATTERNS[self.pattern].sinks if self.sinks is None else bool(self.sinks)

    def to_dict(self) -> dict:
        doc = asdict(self)
        if doc["layer_shares"] is None:  # written only when set: a config without it reads and writes as before
            del doc["layer_shares"]
        else:
            doc["layer_shares"] = list(doc["layer_shares"])
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> "SparseConfig":
        """The config of ``to_dict``; an unknown field or a bad value is a ``UserError``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(doc) - known)
        if unknown:
            raise UserError(f"unknown sparse config field(s): {', '.join(unknown)}")
        return cls(**doc)
