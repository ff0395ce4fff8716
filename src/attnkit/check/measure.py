"""The measured pass: one forward through the seam on real text, beside the prediction.

``StatsCollector`` gives each head's largest logit (``logit_max``), its mean row range
(``logit_range``) and the largest |q.k| before scaling (``qk_absmax``); the prediction for the
same weights and length is ``estimate(..., moments=moments_from_weights(model))``. They agree
when the model-level figures (largest logit of the forward; median and largest head row range)
are within ``AGREEMENT_FACTOR`` of each other.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch

from attnkit.check.estimate import LogitEstimate
from attnkit.common.data import load_corpus
from attnkit.common.data.blocks import encode_documents, split_blocks
from attnkit.common.distributed import DistEnv, agree, gather_from_ranks, rank_share
from attnkit.common.findings import threshold
from attnkit.seam import AttentionSession, StatsCollector, attach, eval_mode, forward_no_grad

AGREEMENT_FACTOR = threshold("agreement_factor")  # either way; why 2.5: attnkit.common.findings.THRESHOLDS
MEASURE_TEXT_SPLIT = "test"  # KJV chapters the reference model never trained on


@dataclass
class Comparison:
    figure: str
    predicted: float
    measured: float
    agrees: bool

    @property
    def ratio(self) -> float:
        return self.predicted / self.measured if self.measured else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Measurement:
    tokens: int
    text: str  # where the tokens came from
    heads: list[dict]  # layer, head, measured logit_max / logit_range / qk_absmax, predicted head_max / row_range
    comparisons: list[Comparison] = field(default_factory=list)
    factor: float = AGREEMENT_FACTOR
    blocks: int = 1  # blocks of ``tokens`` tokens measured; the figures are their extremes
    processes: int = 1  # torch.distributed ranks that shared the blocks (torchrun)
    activation_absmax: float | None = None  # the largest |output| of any leaf module in the forward
    activation_module: str | None = None  # the module that produced it

    @property
    def agrees(self) -> bool:
        return all(c.agrees for c in self.comparisons)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "blocks": self.blocks, "text": self.text, "agreement_factor": self.factor, "agrees": self.agrees,
                **({"processes": self.processes} if self.processes > 1 else {}),  # only for a run over several ranks
                "activation_absmax": self.activation_absmax, "activation_module": self.activation_module,
                "comparisons": [c.to_dict() for c in self.comparisons], "heads": self.heads}


def _agrees(predicted: float, measured: float, factor: float) -> bool:
    if measured <= 0 or predicted <= 0:
        return abs(predicted - measured) < 1e-6
    return 1 / factor <= predicted / measured <= factor


def sample_ids(tokenizer, seq_len: int) -> torch.Tensor:
    """(1, seq_len) token ids from the KJV test split (fewer if the split is shorter)."""
    docs = load_corpus("kjv").split(MEASURE_TEXT_SPLIT)
    ids: list[torch.Tensor] = []
    total = 0
    for start in range(0, len(docs), 8):  # encode a few chapters at a time, only as many as needed
        chunk = encode_documents(tokenizer, docs[start:start + 8])
        ids.append(chunk)
        total += chunk.numel()
        if total >= seq_len:
            break
    return torch.cat(ids)[:seq_len].unsqueeze(0)


def dataset_blocks(tokenizer, texts: list[str], seq_len: int, samples: int) -> torch.Tensor:
    """(N, seq_len) token ids: the texts' tokens end to end, cut into full blocks, the first ``samples``
    of them (one shorter block when the texts hold fewer than ``seq_len`` tokens)."""
    ids = encode_documents(tokenizer, texts)
    blocks = split_blocks(ids, seq_len)
    full = [b for b in blocks if b.numel() == seq_len]
    return torch.stack(full[:samples]) if full else blocks[0].unsqueeze(0)


def measure(model, tokenizer, estimate_: LogitEstimate, seq_len: int, factor: float = AGREEMENT_FACTOR, *,
            texts: list[str] | None = None, source: str | None = None, samples: int = 8,
            batch_size: int = 8, env: DistEnv | None = None) -> Measurement:
    """Forwards of ``model`` through the seam on ``seq_len``-token blocks; compare with ``estimate_``
    (which must have been made from this model's weights, at this length). Without ``texts`` one
    block of the KJV test split; with them (``source`` names them) up to ``samples`` blocks of
    their tokens, ``batch_size`` a forward: the measured figures are the extremes over every block.
    ``env``: under ``torchrun`` each rank runs its share of the blocks and the statistics are pooled."""
    env = env or DistEnv()
    ids = sample_ids(tokenizer, seq_len) if texts is None else dataset_blocks(tokenizer, texts, seq_len, samples)
    collector = StatsCollector()
    session = AttentionSession(taps=[collector])
    bert = "bert" in type(model).__name__.lower() or getattr(getattr(model, "config", None), "model_type", "") == "bert"
    device = next((q.device for q in model.parameters()), torch.device("cpu"))  # the blocks follow the model

    largest = _LargestOutput(model)

    def run_share() -> None:
        with eval_mode(model), attach(model, session), largest:
            share = rank_share(ids, env)
            for batch in share.split(batch_size) if len(share) else ():  # a rank past the last block: none
                batch = batch.to(device)
                inputs = {"input_ids": batch}
                if bert:
                    inputs["attention_mask"] = torch.ones_like(batch)
                forward_no_grad(model, **inputs)

    agree(env, run_share)
    if env.distributed:
        collector.all_reduce()
    measured = collector.heads()
    predicted = {(h["layer"], h["head"]): h for h in estimate_.per_head}
    rows = []
    for h in measured:
        p = predicted.get((h["layer"], h["head"]), {})
        rows.append({"layer": h["layer"], "head": h["head"], "logit_max": h["logit_max"], "logit_range": h["logit_range"],
                     "qk_absmax": h["qk_absmax"], "predicted_head_max": p.get("head_max"),
                     "predicted_row_range": p.get("row_range")})
    measured_max = max(h["logit_max"] for h in measured)
    measured_qk = max(h["qk_absmax"] for h in measured)
    ranges = [h["logit_range"] for h in measured]
    predicted_ranges = [r["predicted_row_range"] for r in rows if r["predicted_row_range"] is not None]
    comparisons = [
        Comparison("largest logit", estimate_.model_max, measured_max, _agrees(estimate_.model_max, measured_max, factor)),
        Comparison("largest |q.k| before scaling", estimate_.raw_absmax, measured_qk,
                   _agrees(estimate_.raw_absmax, measured_qk, factor)),
    ]
    if predicted_ranges:
        pm, mm = statistics.median(predicted_ranges), statistics.median(ranges)
        comparisons.append(Comparison("median head row range", pm, mm, _agrees(pm, mm, factor)))
        px, mx = max(predicted_ranges), max(ranges)
        comparisons.append(Comparison("largest head row range", px, mx, _agrees(px, mx, factor)))
    where = f"KJV {MEASURE_TEXT_SPLIT} split" if texts is None else str(source)
    top, module = largest.result(env)
    return Measurement(int(ids.shape[1]), where, rows, comparisons, factor, blocks=int(ids.shape[0]),
                       processes=env.world_size, activation_absmax=top, activation_module=module)


class _LargestOutput:
    """The largest |output| of any leaf module during the forwards (an MLP past fp16's 65,504 breaks a
    half-precision run outside attention), and the module's name: forward hooks on every leaf module,
    removed on exit."""

    def __init__(self, model) -> None:
        self.model, self.handles, self.top, self.name = model, [], 0.0, None

    def __enter__(self) -> "_LargestOutput":
        for name, module in self.model.named_modules():
            if next(module.children(), None) is None:
                self.handles.append(module.register_forward_hook(
                    lambda _m, _i, out, name=name: self._seen(name, out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _seen(self, name: str, output) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.numel():
            value = float(output.detach().abs().amax())
            if value > self.top or value != value:
                self.top, self.name = value, name

    def result(self, env: DistEnv) -> tuple[float | None, str | None]:
        """(largest, module name), the largest over every rank under torchrun; (None, None) without a forward."""
        seen = [(top, name) for top, name in gather_from_ranks((self.top, self.name), env) if name is not None]
        if not seen:
            return None, None
        # NaN first (a NaN output is the worst there is), then the largest; the lowest rank on a tie
        return max(seen, key=lambda t: (t[0] != t[0], t[0]))
