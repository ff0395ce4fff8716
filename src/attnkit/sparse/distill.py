"""Distil a sparse attention pattern from the dense model it replaces (``attnkit sparse train``).

The base model is frozen; the teacher is the same model with its own dense attention, run under
``no_grad``; the student is the model with block-sparse attention (``sparse_attention``) whose
gates — and, with ``train_projections``, its attention modules' own projections — train. Loss:

    KL(P_dense ‖ P_sparse) of the next-token distributions, averaged over positions
    + map_weight · KL(pooled dense attention map ‖ gate)   (``targets.py``: map_target "max" is
                                                            SeerAttention's, "mass" the block's attention mass)

The first term reaches the gate through the kernel's gate prior on kept blocks (see
``block_attention``); the second teaches it about the blocks it did not keep. Data: random
windows of ``seq_len`` tokens of a corpus split (the built-in KJV's train split by default),
tokenised with the model's tokenizer. Training runs in ``attnkit.common.training`` (AdamW, warmup +
cosine, clipping, checkpoints, exact resume, torchrun/DDP).

Output directory::

    sparse_gates.safetensors + sparse_config.json   the trained gates (``attnkit.sparse.io.save_gates``)
    projections.safetensors  with train_projections: the attention modules' trained parameters
    train_summary.json       {"sparse": SparseConfig, "distill": DistillSettings, "train": ..., "history": [...]}
    checkpoints/             attnkit.common.training checkpoints (resume with --resume)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from attnkit.common.data import encode_documents, load_corpus, random_blocks
from attnkit.errors import UserError
from attnkit.metrics.fidelity import distill_kl
from attnkit.common.io import write_atomic
from attnkit.seam import AttentionSession, attach, observe_forward
from attnkit.seam.sites import Site
from attnkit.sparse.attention import sparse_attention
from attnkit.sparse.config import SparseConfig
from attnkit.sparse.gates import SparseGates, make_gates
from attnkit.sparse.io import WEIGHTS, load_gates, save_gates
from attnkit.sparse.patterns import get_pattern
from attnkit.sparse.targets import PooledMapTarget, get_reduction, map_loss
from attnkit.seam.taps import Tap
from attnkit.common.training import StepOutput, TrainConfig, TrainResult, train

SUMMARY_FILE = "train_summary.json"
PROJECTIONS_FILE = "projections.safetensors"


@dataclass
class DistillSettings:
    """seq_len: tokens per training window; batch_size: windows per step (the global batch under
    torchrun); map_weight: weight of the pooled-map loss (0: next-token KL only);
    train_projections: also train the attention modules' own parameters; corpus / split: the data;
    map_target: how the dense map is pooled into blocks for the map loss (``targets.REDUCTIONS``)."""

    seq_len: int = 1024
    batch_size: int = 2
    map_weight: float = 0.0
    train_projections: bool = False
    corpus: str = "kjv"
    split: str = "train"
    gate_init: str = "uniform"
    map_target: str = "max"

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1:
            raise UserError(f"seq_len must be >= 2 and batch_size >= 1, got {self.seq_len} and {self.batch_size}")
        if self.map_weight < 0:
            raise UserError(f"the map-loss weight must be >= 0, got {self.map_weight}")
        if self.gate_init not in GATE_INITS:
            raise UserError(f"unknown gate init '{self.gate_init}' (known: {', '.join(GATE_INITS)})")
        get_reduction(self.map_target)  # a UserError naming the known ones


def moba_init(gates: SparseGates) -> None:
    """Set every gate to score key blocks as ``moba`` does: ⟨Σ_group mean query, mean key⟩ (÷ √gate_dim).

    The query projection sums the group's pooled heads (identity blocks), the key projection picks
    the block's mean key (the third of its (max, min, mean) statistics): a trained gate then starts
    from the best training-free selection instead of a uniform one (which keeps what
    ``sinks_window`` keeps). Needs ``gate_dim`` = the head dimension.
    """
    with torch.no_grad():
        for gate in gates.gates.values():
            D, G, dg = gate.head_dim, gate.groups, gate.gate_dim
            if dg != D:
                raise UserError(f"a moba-initialised gate needs --gate-dim equal to the head dimension ({D}), got {dg}")
            eye = torch.eye(D, dtype=gate.q_weight.dtype, device=gate.q_weight.device)
            gate.q_weight.copy_(eye.repeat(G, 1).expand(gate.num_kv_heads, G * D, D))
            gate.k_weight.zero_()
            gate.k_weight[:, 2 * D:] = eye
            gate.q_bias.zero_()
            gate.k_bias.zero_()


GATE_INITS = {"uniform": lambda gates: None, "moba": moba_init}


class _Modules(Tap):
    """Which module makes each site's attention call (one probe forward)."""

    wants_call = True
    wants_chunks = False

    def __init__(self) -> None:
        self.modules: dict[Site, nn.Module] = {}

    def on_call(self, call) -> None:
        self.modules[call.site] = call.module


def attention_modules(model: nn.Module) -> dict[Site, nn.Module]:
    """{site: the attention module of that call}, asked of the seam (a two-token probe, in eval mode)."""
    tap = _Modules()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    observe_forward(model, AttentionSession(taps=[tap]), input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    return tap.modules


@contextmanager
def frozen(model: nn.Module, train_projections: bool = False) -> Iterator[list[nn.Parameter]]:
    """The model in eval mode with no parameter requiring grad — except, with ``train_projections``,
    its attention modules' parameters (yielded). Left exactly as found on exit, also on an error."""
    was_training = model.training
    saved = [(p, p.requires_grad) for p in model.parameters()]
    trainable: list[nn.Parameter] = []
    try:
        model.eval()
        for p, _ in saved:
            p.requires_grad_(False)
        if train_projections:
            for module in attention_modules(model).values():
                for p in module.parameters():
                    p.requires_grad_(True)
                    trainable.append(p)
        yield trainable
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)


class Distiller(nn.Module):
    """forward(ids (B, T)) -> (loss, metrics): the dense teacher, then the sparse student, on ``ids``.

    ``student`` and ``gates`` are submodules, so DDP averages the gradients of whatever of them
    trains (the gates; the attention projections with ``train_projections``). The teacher is kept
    outside the module tree: it is the base model, frozen.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: SparseConfig, gates: SparseGates | None,
                 settings: DistillSettings) -> None:
        super().__init__()
        self.student, self.gates, self.cfg, self.settings = student, gates, cfg, settings
        self._teacher = [teacher]  # a list: not registered, not wrapped, not broadcast by DDP

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        pooled = PooledMapTarget(self.cfg.block_size, self.settings.map_target) if self.settings.map_weight > 0 else None
        with torch.no_grad(), (attach(self.teacher, taps=[pooled]) if pooled is not None else nullcontext()):
            teacher_logits = self.teacher(input_ids=ids).logits  # (B, T, V)
        with sparse_attention(self.student, self.cfg, gates=self.gates) as handle:
            student_logits = self.student(input_ids=ids).logits
        kl = distill_kl(teacher_logits, student_logits)
        metrics = {"kl": kl.detach(), "density": torch.tensor(handle.density())}
        loss = kl
        if pooled is not None:
            m = map_loss(handle.gate_log_probs, pooled)
            metrics["map_kl"] = m.detach()
            loss = loss + self.settings.map_weight * m
        return loss, metrics


def _step(module: nn.Module, ids: Tensor) -> StepOutput:
    loss, metrics = module(ids)
    return StepOutput(loss, metrics)


def training_tokens(tokenizer, settings: DistillSettings) -> Tensor:
    """The corpus split as one token stream (documents joined by the end-of-text token)."""
    ids = encode_documents(tokenizer, load_corpus(settings.corpus).split(settings.split))
    if ids.numel() <= settings.seq_len:
        raise UserError(f"the {settings.corpus} {settings.split} split has {ids.numel()} tokens, "
                        f"not more than --seq-len {settings.seq_len}")
    return ids


def check_length(model: nn.Module, seq_len: int) -> None:
    """A sequence longer than a learned position table cannot be embedded: say so before training."""
    config = getattr(model, "config", None)
    table = getattr(config, "n_positions", None)
    if table is None and getattr(config, "position_embedding_type", None) == "absolute":
        table = getattr(config, "max_position_embeddings", None)
    if table is not None and seq_len > table:
        raise UserError(f"--seq-len {seq_len} is longer than the model's {table} learned positions")


def distill(model: nn.Module, tokenizer, cfg: SparseConfig, settings: DistillSettings, train_cfg: TrainConfig,
            out: str | Path, tokens: Tensor | None = None, start_from: SparseGates | None = None,
            calibration_windows: int = 0) -> TrainResult:
    """Train ``cfg``'s gates on ``model`` (see the module doc); writes ``out``. The model is left as found.
    ``start_from``: gates to continue from (their weights are copied; ``settings.gate_init`` is then not used).
    ``calibration_windows`` > 0: after training, the trained student's density is moved between layers
    (``calibrate_layer_shares`` on that many windows of the training text, ``calibration_ids``) and
    the gates are written with those ``layer_shares``, the calibration in the summary."""
    learned = get_pattern(cfg.pattern).learned
    if not learned and not settings.train_projections:
        raise UserError(f"the {cfg.pattern} pattern has nothing to train; use a learned pattern (learned_gate) "
                        f"or --train-projections")
    if not learned and settings.map_weight:
        raise UserError(f"the map loss trains a gate's block scores and the {cfg.pattern} pattern has none: "
                        f"--map-loss needs a learned pattern (learned_gate)")
    check_length(model, settings.seq_len)
    out = Path(out)
    device = next(model.parameters()).device
    ids = (tokens if tokens is not None else training_tokens(tokenizer, settings)).to(device)
    gates = _seeded_gates(model, cfg, train_cfg.seed)  # every run starts from the same gates
    if gates is not None and start_from is not None:
        try:
            gates.load_state_dict(start_from.state_dict())
        except RuntimeError as e:
            raise UserError(f"the gates to start from do not fit this model and config: {e}") from None
    elif gates is not None:
        GATE_INITS[settings.gate_init](gates)

    def batch_fn(step: int, generator: torch.Generator) -> Tensor:
        return random_blocks(ids, settings.seq_len, settings.batch_size, generator).to(device)

    train_cfg.meta = {"sparse": cfg.to_dict(), "distill": asdict(settings), **train_cfg.meta}
    train_cfg.metric = "kl" if train_cfg.metric == "loss" else train_cfg.metric  # the bar shows the live KL
    train_cfg.checkpoint_dir = train_cfg.checkpoint_dir or out / "checkpoints"
    # Trained projections change the student: it is a copy, and the model (the teacher) stays as found.
    student = copy.deepcopy(model) if settings.train_projections else model
    with frozen(model), frozen(student, settings.train_projections) if student is not model else nullcontext():
        distiller = Distiller(model, student, cfg, gates, settings)
        result = train(distiller, _step, batch_fn, train_cfg)
        if result.env.is_main:
            calibration = None
            if calibration_windows:
                calib_ids = calibration_ids(ids, settings.seq_len, calibration_windows, train_cfg.seed)
                cal = calibrate_layer_shares(student, cfg, gates, calib_ids, reference=model)
                cfg = replace(cfg, layer_shares=cal.shares)
                calibration = {**cal.as_dict(), "windows": calibration_windows, "seq_len": settings.seq_len,
                               "split": settings.split}
            save_trained(out, cfg, settings, train_cfg, result, gates, student if settings.train_projections else None,
                         calibration)
    return result


def calibration_ids(ids: Tensor, seq_len: int, windows: int, seed: int) -> Tensor:
    """(windows, seq_len) windows at random offsets of the training tokens ``ids`` that the layer
    budget is calibrated on after training: drawn from a generator of their own, seeded from ``seed``
    through a hash (a step's batch generator is seeded seed · 1,000,003 + step: no arithmetic relation
    to it)."""
    import hashlib

    stream = int.from_bytes(hashlib.sha256(f"layer budget calibration {seed}".encode()).digest()[:7], "little")
    return random_blocks(ids, seq_len, windows, torch.Generator().manual_seed(stream))


def _seeded_gates(model: nn.Module, cfg: SparseConfig, seed: int) -> SparseGates | None:
    """``make_gates`` with its random key projections drawn from ``seed`` (the caller's RNG untouched)."""
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        return make_gates(model, cfg)
    finally:
        torch.set_rng_state(state)


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors written whole or not at all."""
    from safetensors.torch import save

    write_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def save_trained(out: Path, cfg: SparseConfig, settings: DistillSettings, train_cfg: TrainConfig,
                 result: TrainResult, gates: SparseGates | None, model: nn.Module | None,
                 calibration: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if gates is not None:
        save_gates(gates, cfg, out)
    if model is not None:
        params = {f"{i}.{n}": p for i, (site, m) in enumerate(sorted(attention_modules(model).items()))
                  for n, p in m.named_parameters()}
        _save_tensors(params, out / PROJECTIONS_FILE)
    doc = {"sparse": cfg.to_dict(), "distill": asdict(settings),
           "train": {k: v for k, v in train_cfg.fingerprint().items() if k != "meta"},
           "steps": result.steps, "world_size": result.env.world_size, "history": result.history}
    if calibration is not None:
        doc["calibration"] = calibration
    write_atomic(out / SUMMARY_FILE, json.dumps(doc, indent=1) + "\n")


@dataclass
class TrainedSparse:
    cfg: SparseConfig
    gates: SparseGates | None
    info: dict


def load_trained(model: nn.Module, directory: str | Path, density: float | None = None) -> TrainedSparse:
    """The config and gates ``distill`` wrote to ``directory``, made for ``model`` (a density may be
    given to run the trained gates at another density). With trained projections they are loaded
    into ``model``'s attention modules: pass a copy to keep the base model."""
    d = Path(directory)
    if not (d / SUMMARY_FILE).exists():
        raise UserError(f"{directory} is not a directory that attnkit sparse train wrote (no {SUMMARY_FILE})")
    try:
        info = json.loads((d / SUMMARY_FILE).read_text())
        fields = dict(info["sparse"])
    except (ValueError, KeyError) as e:
        raise UserError(f"{d / SUMMARY_FILE} cannot be read ({e})") from e
    gates = None
    if (d / WEIGHTS).exists():
        gates, cfg = load_gates(model, d)
        fields = cfg.to_dict()
    if density is not None:
        fields["density"] = density
    cfg = SparseConfig.from_dict(fields)
    if (d / PROJECTIONS_FILE).exists():
        state = load_file(str(d / PROJECTIONS_FILE))
        with torch.no_grad():
            for i, (site, m) in enumerate(sorted(attention_modules(model).items())):
                for n, p in m.named_parameters():
                    p.copy_(state[f"{i}.{n}"])
    return TrainedSparse(cfg, gates, info)


# --- moving the budget between layers -------------------------------------------------------------

CALIBRATION_DENSITIES = (0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0)


@dataclass
class LayerCalibration:
    """What ``calibrate_layer_shares`` measured and chose.

    kl[layer][density]: next-token KL against dense with only that layer sparse at that density;
    kept[layer][density]: the share of that layer's candidate blocks kept; budget: the kept share
    of the uniform config (every layer at ``density``), which the chosen densities do not exceed
    on average; densities: the chosen density of each layer; shares: densities / ``density``."""

    density: float
    kl: dict[int, dict[float, float]]
    kept: dict[int, dict[float, float]]
    budget: float
    densities: dict[int, float]
    shares: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"density": self.density, "budget": self.budget, "densities": self.densities,
                "shares": list(self.shares), "kl": self.kl, "kept": self.kept}


@torch.no_grad()
def calibrate_layer_shares(model: nn.Module, cfg: SparseConfig, gates: SparseGates | None, ids: Tensor,
                           grid: tuple[float, ...] = CALIBRATION_DENSITIES,
                           reference: nn.Module | None = None) -> LayerCalibration:
    """Per-layer densities for ``cfg`` that keep, on average over layers, the blocks the uniform
    config keeps, chosen to lose the least next-token KL on ``ids`` (N, T) (calibration text, not
    the evaluation's) against the dense ``reference`` (default: ``model`` itself; the base model
    when ``model`` is a student with trained projections).

    Each layer is run sparse alone (the others dense) at every density of ``grid``; its KL against
    the dense model is taken as that layer's cost, the costs as adding up. Greedy: every layer
    starts at the highest density that keeps no more blocks than the lowest (at short lengths the
    budget's floor makes several alike), then the move of one layer up the grid that buys the most
    KL per kept block is made, while the average kept share stays within the budget. The model
    is left as found (``sparse_attention``'s contract); ``cfg.layer_shares`` is ignored."""
    from attnkit.metrics.fidelity import next_token_kl

    cfg = replace(cfg, layer_shares=None)
    layers = sorted({site.layer for site in attention_modules(model)})
    grid = tuple(sorted(set(grid) | {cfg.density}))
    dense = [(reference if reference is not None else model)(input_ids=w[None]).logits.float() for w in ids]
    kl: dict[int, dict[float, float]] = {}
    kept: dict[int, dict[float, float]] = {}
    for layer in layers:
        kl[layer], kept[layer] = {}, {}
        for d in grid:
            at = replace(cfg, density=d)
            sparse, shares = [], []
            for w in ids:
                with sparse_attention(model, at, gates=gates, layers=[layer]) as handle:
                    sparse.append(model(input_ids=w[None]).logits.float())
                shares.append(handle.density())
            kl[layer][d] = float(next_token_kl(torch.cat(dense), torch.cat(sparse)))
            kept[layer][d] = sum(shares) / len(shares)
    budget = sum(kept[layer][cfg.density] for layer in layers) / len(layers)
    step = {layer: 0 for layer in layers}
    for layer in layers:  # a step up that keeps no more blocks here (the budget's floor) is free: take it
        while step[layer] + 1 < len(grid) and kept[layer][grid[step[layer] + 1]] <= kept[layer][grid[step[layer]]] + 1e-12:
            step[layer] += 1
    while True:
        used = sum(kept[layer][grid[step[layer]]] for layer in layers) / len(layers)
        best, best_gain = None, 0.0
        for layer in layers:
            now = grid[step[layer]]
            for j in range(step[layer] + 1, len(grid)):  # any step up: a flat stretch may precede a drop
                cost = (kept[layer][grid[j]] - kept[layer][now]) / len(layers)
                if used + cost > budget + 1e-9:
                    break
                gain = (kl[layer][now] - kl[layer][grid[j]]) / max(cost, 1e-12)
                if gain > best_gain:
                    best, best_gain = (layer, j), gain
        if best is None:
            break
        step[best[0]] = best[1]
    densities = {layer: grid[step[layer]] for layer in layers}
    shares = tuple(densities.get(i, cfg.density) / cfg.density for i in range(max(layers) + 1))
    return LayerCalibration(cfg.density, kl, kept, budget, densities, shares)
