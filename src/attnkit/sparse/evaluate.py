"""How much sparse attention costs a model in fidelity (``attnkit sparse eval``).

For each sequence length, pattern and density, on held-out text (the built-in KJV's test split,
cut into non-overlapping windows), against the same model with its own dense attention:

- ``kl``: next-token KL(P_dense ‖ P_sparse), mean over positions (nats);
- ``perplexity`` (and its ratio to dense), ``top1_accuracy`` (its ratio to dense: the target "95 %
  of baseline accuracy") and ``top1_agreement`` (same most likely next token as dense);
- ``prob_mse``: the attention-probability error of each sparse call against dense attention *on
  the same queries and keys* (the error the pattern makes where it stands, not compounded through
  the layers): for every query row and every key it may see, (p − p̃)², p̃ being the probability
  the sparse kernel gives (zero on dropped blocks), averaged over all (row, allowed key) pairs of
  every layer and head; split into the kept part and the dropped part, with the dropped mass
  (``metrics.fidelity.ProbError``). Computed chunk by chunk of query rows: no T × T kept;
- ``grad_cosine``: for each attention layer, the cosine between the gradient of the LM loss
  (next-token cross-entropy on the window) with respect to that layer's attention parameters
  (its q/k/v/o projections: every parameter of the attention module the seam reports for the
  site) under dense and under sparse attention; ``grad_cosine_min`` over layers is what the
  target "≥ 0.95 between dense and sparse attention layers" is checked on.

On an encoder (MiniLM): the attention replaced with no fine-tuning, bidirectional (no causal
restriction: a query block may keep any key block), and the cosine between the dense and sparse
mean-pooled sentence embeddings of held-out passages (padding included).

And what it costs on this machine (``cost``, ``attnkit.sparse.cost``): the time and peak memory of a
forward over one window (encoders: one batch of passages), against the dense model's, in interleaved rounds (``EvalPlan.speed_rounds``;
0 skips it).

``TARGETS`` are the fidelity targets sparse attention is held to; ``smallest_densities`` finds, per pattern and
length, the smallest density at which each holds (at it and every larger density measured).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.common.data import encode_documents, load_corpus
from attnkit.errors import UserError
from attnkit.seam.kernels.blocks import BlockGeometry
from attnkit.seam.kernels.dense import chunk_logits, rows_of
from attnkit.metrics.fidelity import (ProbError, cosine, mean_pool, next_token_kl, perplexity, restricted_softmax,
                                      row_cosines, smallest_density, top1_accuracy, top1_agreement)
from attnkit.seam import AttentionSession, attach
from attnkit.seam.call import AttentionCall
from attnkit.seam.plan import Mods
from attnkit.seam.sites import Site
from attnkit.sparse.attention import SparseHandle, is_causal_call, sparse_attention
from attnkit.sparse.config import SparseConfig
from attnkit.sparse.distill import (PROJECTIONS_FILE, SUMMARY_FILE, attention_modules, calibrate_layer_shares,
                                    load_trained)
from attnkit.sparse.gates import SparseGates
from attnkit.seam.taps import Tap

SCHEMA = "attnkit.sparse.eval/1"


@dataclass(frozen=True)
class Target:
    """One of the fidelity targets: ``metric`` of a result, and whether a value meets it."""

    name: str
    metric: str
    holds: Callable[[float], bool]
    text: str


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("prob_mse", "prob_mse", lambda v: v <= 1e-4, "attention-probability MSE <= 1e-4"),
    Target("grad_cosine", "grad_cosine_min", lambda v: v >= 0.95, "gradient cosine >= 0.95 (every layer)"),
    Target("kl", "kl", lambda v: v <= 1e-3, "next-token KL <= 0.001"),
    Target("accuracy", "top1_accuracy_ratio", lambda v: v >= 0.95, ">= 95% of dense top-1 accuracy"),
)}


# --- the attention-probability error, measured on the sparse forward ---------------------------

class ProbErrorTap(Tap):
    """Beside a ``sparse_attention`` session that keeps its masks (``keep_masks=True``): for each
    call, dense vs sparse probabilities on the call's own queries and keys, chunk by chunk of query
    rows, summed into ``errors[site]``.

    The sparse probabilities are the kernel's: softmax over the allowed keys of the kept blocks of
    the logits plus the gate's prior (``gate_bias`` · log p of the block, learned patterns).
    """

    wants_call = True
    wants_chunks = False
    wants_output = True

    def __init__(self, handle: SparseHandle, chunk_elements: int = 1 << 22) -> None:
        if not handle.keep_masks:
            raise UserError("ProbErrorTap reads the blocks each call kept: sparse_attention(model, cfg, keep_masks=True)")
        self.handle = handle
        self.chunk_elements = chunk_elements
        self.errors: dict[Site, ProbError] = {}
        self.query_mask: Tensor | None = None  # (B, Q) False for padding queries
        self.check: Callable[[AttentionCall, Tensor, Tensor, Tensor], None] | None = None  # tests: (call, rows, p̃, out)

    def on_output(self, call: AttentionCall, out: Tensor) -> None:
        masks = self.handle.block_masks.get(call.site)
        if masks is None:  # a call the sparse session did not touch
            return
        self.errors.setdefault(call.site, ProbError()).__iadd__(self.measure(call, masks, out))

    @torch.no_grad()
    def measure(self, call: AttentionCall, masks: Tensor, out: Tensor) -> ProbError:
        q, k = call.query.detach(), call.key.detach()
        B, H, Q, _ = q.shape
        K = call.key_length
        geo = self.handle_geometry(call)
        bs, groups = geo.block_size, call.kv_groups
        lp = self.handle.gate_log_probs.get(call.site)
        # the gate's prior is in the kernel's scores under gate_grad "prior"; "straight_through" keeps
        # only its gradient, so the values are plain attention over the kept blocks
        prior_on = lp is not None and getattr(self.handle.cfg, "gate_grad", "prior") == "prior"
        gate_bias = self.handle.cfg.gate_bias if prior_on else 0.0
        head_group = torch.arange(H, device=q.device) // groups
        key_block = torch.arange(K, device=q.device) // bs
        err = ProbError()
        step = max(1, self.chunk_elements // max(1, B * H * K))
        for start in range(0, Q, step):
            r = torch.arange(start, min(Q, start + step), device=q.device)
            positions = r + (K - Q)
            allowed = rows_of(call.allowed, r, K)
            if call.is_causal or geo.causal:
                causal = torch.arange(K, device=q.device)[None, :] <= positions[:, None]  # (R, K)
                allowed = causal[None, None] if allowed is None else allowed & causal
            bias = rows_of(call.bias, r, K)
            logits, allowed = chunk_logits(call, Mods(), q[:, :, r], k, positions, allowed, bias)  # (B, H, R, K)
            qb = (positions // bs - geo.first_block).clamp(0, geo.n_query_blocks - 1)
            kept = masks[:, head_group][:, :, qb][..., key_block]  # (B, H, R, K)
            sparse_logits = logits
            if gate_bias:
                prior = lp.detach()[:, head_group][:, :, qb][..., key_block]
                sparse_logits = logits + gate_bias * torch.where(kept, prior, 0.0)
            p = restricted_softmax(logits, allowed)
            p_sparse = restricted_softmax(sparse_logits, allowed & kept)
            row_valid = None
            if self.query_mask is not None and self.query_mask.shape == (B, Q):
                row_valid = self.query_mask[:, r]
            err.add(p, p_sparse, kept, allowed, row_valid)
            if self.check is not None:
                self.check(call, r, p_sparse, out)
        return err

    def handle_geometry(self, call: AttentionCall):
        return BlockGeometry(self.handle.cfg.block_size, call.query_length, call.key_length, is_causal_call(call),
                             call.query.device)


# --- gradients of the attention layers --------------------------------------------------------

def attention_parameters(model: nn.Module) -> dict[Site, list[nn.Parameter]]:
    return {site: list(m.parameters()) for site, m in sorted(attention_modules(model).items())}


def attention_gradients(model: nn.Module, ids: Tensor, params: dict[Site, list[nn.Parameter]],
                        context=None, attention_mask: Tensor | None = None) -> dict[Site, Tensor]:
    """{site: the flat gradient of the LM loss on ``ids`` w.r.t. that site's attention parameters},
    with attention as ``context`` sets it (None: the model's own). Parameters that did not require
    grad are switched on for the call and back off after; no ``.grad`` is written."""
    flat = [p for ps in params.values() for p in ps]
    flags = [p.requires_grad for p in flat]
    try:
        for p in flat:
            p.requires_grad_(True)
        with torch.enable_grad(), (context if context is not None else nullcontext()):
            logits = model(input_ids=ids, attention_mask=attention_mask).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        for p, f in zip(flat, flags):
            p.requires_grad_(f)
    out, i = {}, 0
    for site, ps in params.items():
        gs = [g if g is not None else torch.zeros_like(p) for p, g in zip(ps, grads[i: i + len(ps)])]
        out[site] = torch.cat([g.flatten() for g in gs])
        i += len(ps)
    return out


# --- one evaluation -----------------------------------------------------------------------------

@dataclass
class Baseline:
    """The dense model on one length's windows: logits kept for the comparisons."""

    seq_len: int
    ids: Tensor  # (N, T)
    logits: list[Tensor]  # N × (1, T, V)
    perplexity: float
    top1_accuracy: float
    grads: dict[Site, Tensor] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"seq_len": self.seq_len, "windows": int(self.ids.shape[0]), "tokens": int(self.ids.numel()),
                "perplexity": self.perplexity, "top1_accuracy": self.top1_accuracy}


def _cat_logits(logits: list[Tensor]) -> Tensor:
    return torch.cat(logits, 0)


@torch.no_grad()
def dense_baseline(model: nn.Module, ids: Tensor, grad_windows: int = 1) -> Baseline:
    logits = [model(input_ids=w[None]).logits.float() for w in ids]
    all_logits = _cat_logits(logits)
    base = Baseline(ids.shape[1], ids, logits, perplexity(all_logits, ids), top1_accuracy(all_logits, ids))
    if grad_windows:
        params = attention_parameters(model)
        base.grads = attention_gradients(model, ids[:grad_windows], params)
    return base


def evaluate_pattern(model: nn.Module, cfg: SparseConfig, gates: SparseGates | None, base: Baseline,
                     grad_windows: int = 1) -> dict:
    """Every fidelity metric of ``cfg`` (with ``gates``) against the dense ``base`` (see the module doc)."""
    errors: dict[Site, ProbError] = {}
    logits: list[Tensor] = []
    densities = []
    with torch.no_grad():
        for w in base.ids:
            with sparse_attention(model, cfg, gates=gates, keep_masks=True) as handle:
                tap = ProbErrorTap(handle)
                with attach(model, AttentionSession(taps=[tap])):
                    logits.append(model(input_ids=w[None]).logits.float())
                densities.append(handle.density())
            for site, e in tap.errors.items():
                errors.setdefault(site, ProbError()).__iadd__(e)
    sparse = _cat_logits(logits)
    dense = _cat_logits(base.logits)
    total = ProbError()
    for e in errors.values():
        total += e
    acc = top1_accuracy(sparse, base.ids)
    ppl = perplexity(sparse, base.ids)
    result = {
        "pattern": cfg.pattern, "series": cfg.pattern, "density": cfg.density, "seq_len": base.seq_len,
        "block_size": cfg.block_size, "measured_density": sum(densities) / len(densities),
        "kl": float(next_token_kl(dense, sparse)),
        "perplexity": ppl, "perplexity_ratio": ppl / base.perplexity,
        "top1_accuracy": acc, "top1_accuracy_ratio": acc / base.top1_accuracy if base.top1_accuracy else float("nan"),
        "top1_agreement": top1_agreement(dense, sparse),
        **{f"prob_{k}": v for k, v in total.as_dict().items() if k not in ("entries", "rows")},
        "prob_mse_by_layer": {str(s): e.mse for s, e in sorted(errors.items())},
    }
    if base.grads and grad_windows:
        params = attention_parameters(model)
        sparse_grads = attention_gradients(model, base.ids[:grad_windows], params,
                                           sparse_attention(model, cfg, gates=gates))
        cos = {str(s): cosine(base.grads[s], g) for s, g in sparse_grads.items()}
        result.update(grad_cosine_min=min(cos.values()), grad_cosine_mean=sum(cos.values()) / len(cos),
                      grad_cosine_by_layer=cos)
    return result


def attach_costs(model: nn.Module, inputs: dict[str, Tensor],
                 runs: list[tuple[dict, nn.Module, SparseConfig, SparseGates | None]], rounds: int) -> None:
    """Add ``cost`` to each run's result: a forward of ``inputs`` (the model's keyword arguments: one
    window, or one batch of passages) under its configuration against the dense model's, timed in
    interleaved rounds, and its peak memory (``attnkit.sparse.cost.compare_costs``)."""
    from attnkit.sparse.cost import compare_costs

    def forward(m: nn.Module, context=None):
        def step():
            with torch.no_grad(), (context() if context is not None else nullcontext()):
                m(**inputs)
        return step

    steps = {"dense": forward(model)}
    for i, (_, student, cfg, gates) in enumerate(runs):
        steps[str(i)] = forward(student, lambda s=student, c=cfg, g=gates: sparse_attention(s, c, gates=g))
    costs = compare_costs(steps, "dense", rounds, inputs["input_ids"].device)
    dense = costs["dense"]
    for i, (r, *_rest) in enumerate(runs):
        c = costs[str(i)]
        r["cost"] = {"tokens": int(inputs["input_ids"].numel()), "rounds": rounds, "time_s": c["time_s"],
                     "dense_time_s": dense["time_s"], "time_ratio": c["time_ratio"],
                     "time_ratio_rounds": c["time_ratio_rounds"], "peak_bytes": c["peak_bytes"],
                     "dense_peak_bytes": dense["peak_bytes"], "memory_ratio": c["memory_ratio"]}


def series_of(result: dict) -> str:
    """The series a result row is a point of: its pattern (``moba``), or the pattern with its layer
    budget (``moba + budget``); a row without ``series`` is its pattern's."""
    return result.get("series", result["pattern"])


def smallest_densities(results: Sequence[dict], targets: dict[str, Target] = TARGETS) -> dict:
    """{seq_len: {series: {target: smallest density meeting it, or None}}}, a series being a pattern
    (``moba``) or a pattern with its layer budget (``moba + budget``)."""
    out: dict = {}
    for r in results:
        out.setdefault(str(r["seq_len"]), {}).setdefault(series_of(r), {})
    for length, by_pattern in out.items():
        for pattern in by_pattern:
            rows = [r for r in results if str(r["seq_len"]) == length and series_of(r) == pattern]
            for name, t in targets.items():
                pts = [(r["density"], r[t.metric]) for r in rows if t.metric in r and not _nan(r[t.metric])]
                by_pattern[pattern][name] = smallest_density(pts, t.holds) if pts else None
    return out


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


# --- encoders: sentence embeddings -------------------------------------------------------------

@torch.no_grad()
def embedding_fidelity(model: nn.Module, batch: dict, cfg: SparseConfig) -> dict:
    """Cosine of dense vs sparse mean-pooled sentence embeddings of ``batch`` (tokenizer output,
    padded), attention replaced with no fine-tuning."""
    valid = batch["attention_mask"].bool()
    dense = mean_pool(model(**batch).last_hidden_state.float(), valid)
    with sparse_attention(model, cfg, keep_masks=True) as handle:
        tap = ProbErrorTap(handle)
        tap.query_mask = valid
        with attach(model, AttentionSession(taps=[tap])):
            sparse = mean_pool(model(**batch).last_hidden_state.float(), valid)
        density = handle.density()
    total = ProbError()
    for e in tap.errors.values():
        total += e
    cos = row_cosines(dense, sparse)[valid.any(-1)]  # an all-padding sequence has no embedding to compare
    return {"pattern": cfg.pattern, "density": cfg.density, "block_size": cfg.block_size,
            "measured_density": density, "sentences": int(cos.numel()),
            "tokens": int(valid.sum()), "embedding_cosine_mean": float(cos.mean()),
            "embedding_cosine_min": float(cos.min()), "prob_mse": total.mse, "prob_dropped_mass": total.mean_dropped_mass}


def eval_windows(tokenizer, seq_len: int, tokens: int, corpus: str = "kjv", split: str = "test",
                 stream: Tensor | None = None) -> Tensor:
    """(N, seq_len) non-overlapping windows from the start of the held-out split, N = tokens // seq_len (>= 1)."""
    ids = stream if stream is not None else encode_documents(tokenizer, load_corpus(corpus).split(split))
    n = max(1, tokens // seq_len)
    if ids.numel() < n * seq_len:
        n = ids.numel() // seq_len
        if n < 1:
            raise UserError(f"the {corpus} {split} split has {ids.numel()} tokens: fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


# --- the whole evaluation -----------------------------------------------------------------------

@dataclass
class EvalPlan:
    """patterns × densities × seq_lens, on ``tokens`` held-out tokens per length (windows of the
    length, from the start of the corpus split); ``gates``: directories ``attnkit sparse train``
    wrote (their learned gates join as pattern ``learned_gate``, run at every density, the
    directory trained at that density preferred; gates written with layer shares run uniform as
    ``learned_gate`` and, at the density they were calibrated at, with their shares as
    ``learned_gate + budget``). Encoders: ``sentences`` passages of at most
    ``max_length`` tokens, batched by 8 with padding. ``speed_rounds``: interleaved timing rounds of
    every configuration against dense (0: no time and memory columns). ``layer_budget``: beside each
    pattern at each density, the same pattern with its density moved between layers
    (``calibrate_layer_shares`` on ``calibration_windows`` random windows of the length from the
    ``calibration_split``, never the evaluated one; causal LMs)."""

    patterns: list[str]
    densities: list[float]
    seq_lens: list[int]
    block_size: int = 64
    tokens: int = 8192
    grad_windows: int = 1
    corpus: str = "kjv"
    split: str = "test"
    gates: list[str] = field(default_factory=list)
    sentences: int = 32
    max_length: int = 256
    speed_rounds: int = 3
    layer_budget: bool = False
    calibration_windows: int = 4
    calibration_split: str = "train"


def calibrate(model: nn.Module, cfg: SparseConfig, gates: SparseGates | None, ids: Tensor, plan: EvalPlan,
              reference: nn.Module | None = None) -> tuple[SparseConfig, dict]:
    """``cfg`` with the layer shares ``calibrate_layer_shares`` chooses on ``ids`` (calibration
    windows) against the dense ``reference`` (default ``model``), and what it measured (a result's
    ``layer_budget`` entry)."""
    cal = calibrate_layer_shares(model, cfg, gates, ids, reference=reference)
    record = {**cal.as_dict(), "windows": int(ids.shape[0]), "split": plan.calibration_split}
    return replace(cfg, layer_shares=cal.shares), record


def calibration_windows(stream: Tensor, seq_len: int, plan: EvalPlan) -> Tensor:
    """(calibration_windows, seq_len) windows at random offsets of ``stream`` (the calibration
    split's tokens), the same ones for every pattern and density (seed 0)."""
    from attnkit.common.data import random_blocks

    if stream.numel() <= seq_len:
        raise UserError(f"the {plan.calibration_split} split of {plan.corpus} has {stream.numel()} tokens: too few "
                        f"for a {seq_len}-token calibration window")
    return random_blocks(stream, seq_len, plan.calibration_windows, torch.Generator().manual_seed(0))


def _learned_for(model: nn.Module, plan: EvalPlan, density: float):
    """(model to run, uniform SparseConfig, gates, directory, layer shares) of the trained gates to use
    at ``density``; the shares are those the gates were written with (``sparse train --layer-budget``),
    at the density they were calibrated at only, else None."""
    import copy
    import json
    from pathlib import Path

    def trained_density(d: str) -> float:
        try:
            return float(json.loads((Path(d) / SUMMARY_FILE).read_text())["sparse"]["density"])
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--gates {d} is not a directory that attnkit sparse train wrote ({e})") from e

    best = min(plan.gates, key=lambda d: (abs(trained_density(d) - density), d))
    student = copy.deepcopy(model) if (Path(best) / PROJECTIONS_FILE).exists() else model
    trained = load_trained(student, best, density=density)
    if trained.cfg.block_size != plan.block_size:
        raise UserError(f"the gates in {best} were trained with block size {trained.cfg.block_size}; "
                        f"evaluate with --block-size {trained.cfg.block_size}")
    shares = trained.cfg.layer_shares if trained_density(best) == density else None
    return student, replace(trained.cfg, layer_shares=None), trained.gates, best, shares


def run_eval(model: nn.Module, tokenizer, kind: str, plan: EvalPlan, progress=None) -> dict:
    """Every measurement of the module doc; ``progress(done, total, label)`` is told of each step."""
    from dataclasses import asdict

    update = progress or (lambda done, total, label: None)
    doc = {"schema": SCHEMA, "kind": kind, "plan": asdict(plan),
           "targets_defined": {name: t.text for name, t in TARGETS.items()}}
    if kind == "encoder":
        doc["embedding"] = run_embedding_eval(model, tokenizer, plan, update)
        return doc

    corpus = load_corpus(plan.corpus)
    stream = encode_documents(tokenizer, corpus.split(plan.split))
    patterns = list(plan.patterns)
    if "learned_gate" in patterns and not plan.gates:
        raise UserError("the learned_gate pattern needs trained gates: give --gates DIR (what attnkit sparse train wrote)")
    calibration_stream = None
    if plan.layer_budget:
        if plan.calibration_split == plan.split:
            raise UserError(f"the layer budget is calibrated on other text than the evaluation's: the calibration "
                            f"split and the evaluated split are both '{plan.split}'")
        calibration_stream = encode_documents(tokenizer, corpus.split(plan.calibration_split))
    variants = 2 if plan.layer_budget else 1
    total = len(plan.seq_lens) * (1 + len(patterns) * len(plan.densities) * variants)
    done, results, baselines = 0, [], []
    device = next(model.parameters()).device
    for seq_len in plan.seq_lens:
        ids = eval_windows(tokenizer, seq_len, plan.tokens, plan.corpus, plan.split, stream=stream).to(device)
        update(done, total, f"dense, {seq_len} tokens")
        base = dense_baseline(model, ids, plan.grad_windows)
        baselines.append(base.as_dict())
        done += 1
        runs = []  # (result, model, config, gates) of this length, for the cost columns
        calibration = None if calibration_stream is None else \
            calibration_windows(calibration_stream, seq_len, plan).to(device)
        for pattern in patterns:
            for density in plan.densities:
                update(done, total, f"{pattern} at {density:g}, {seq_len} tokens")
                own_shares = None  # the shares trained gates were written with
                if pattern == "learned_gate":
                    student, cfg, gates, source, own_shares = _learned_for(model, plan, density)
                else:
                    student, cfg, gates, source = model, SparseConfig(pattern=pattern, density=density,
                                                                      block_size=plan.block_size), None, None
                measured = [(evaluate_pattern(student, cfg, gates, base, plan.grad_windows), cfg)]
                budget_cfg = None
                if calibration is not None:
                    update(done + 1, total, f"{pattern} at {density:g}, {seq_len} tokens: calibrating the layer budget")
                    budget_cfg, budget = calibrate(student, cfg, gates, calibration, plan, reference=model)
                elif own_shares is not None:
                    total += 1  # a row the plan did not count: the gates' own budget beside the uniform gate
                    budget_cfg = replace(cfg, layer_shares=own_shares)
                    budget = {"shares": list(own_shares), "source": "gates"}
                if budget_cfg is not None:
                    r = evaluate_pattern(student, budget_cfg, gates, base, plan.grad_windows)
                    r.update(series=f"{pattern} + budget", layer_budget=budget)
                    measured.append((r, budget_cfg))
                for r, run_cfg in measured:
                    if source is not None:
                        r["gates"] = source
                    results.append(r)
                    runs.append((r, student, run_cfg, gates))
                    done += 1
        if plan.speed_rounds and runs:
            update(done, total, f"time and memory against dense, {seq_len} tokens")
            attach_costs(model, {"input_ids": ids[:1]}, runs, plan.speed_rounds)
        del base
    update(done, total, "done")
    doc.update(baselines=baselines, results=results, smallest_density=smallest_densities(results))
    return doc


def embedding_batches(tokenizer, plan: EvalPlan, device) -> list[dict]:
    docs = [d for d in load_corpus(plan.corpus).split(plan.split) if d.strip()][: plan.sentences]
    out = []
    for i in range(0, len(docs), 8):
        enc = tokenizer(docs[i: i + 8], truncation=True, max_length=plan.max_length, padding=True, return_tensors="pt")
        out.append({k: v.to(device) for k, v in enc.items()})
    return out


def run_embedding_eval(model: nn.Module, tokenizer, plan: EvalPlan, update) -> list[dict]:
    """Sentence-embedding cosine of every pattern and density (training-free: no gates on encoders)."""
    device = next(model.parameters()).device
    batches = embedding_batches(tokenizer, plan, device)
    patterns = [p for p in plan.patterns if p != "learned_gate"]
    rows, total, done = [], len(patterns) * len(plan.densities), 0
    runs = []  # (row, model, config, gates), for the cost columns
    for pattern in patterns:
        for density in plan.densities:
            update(done, total, f"{pattern} at {density:g}")
            cfg = SparseConfig(pattern=pattern, density=density, block_size=plan.block_size)
            parts = [embedding_fidelity(model, b, cfg) for b in batches]
            n = sum(p["sentences"] for p in parts)
            rows.append({
                "pattern": pattern, "density": density, "block_size": plan.block_size, "sentences": n,
                "tokens": sum(p["tokens"] for p in parts),
                "measured_density": sum(p["measured_density"] * p["sentences"] for p in parts) / n,
                "embedding_cosine_mean": sum(p["embedding_cosine_mean"] * p["sentences"] for p in parts) / n,
                "embedding_cosine_min": min(p["embedding_cosine_min"] for p in parts),
                "prob_mse": sum(p["prob_mse"] * p["sentences"] for p in parts) / n,
            })
            runs.append((rows[-1], model, cfg, None))
            done += 1
    if plan.speed_rounds and runs and batches:
        update(done, total, "time and memory against dense")
        attach_costs(model, batches[0], runs, plan.speed_rounds)
    return rows
