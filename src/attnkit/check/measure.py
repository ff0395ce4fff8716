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
from attnkit.common.data.blocks import encode_documents
from attnkit.common.findings import threshold
from attnkit.seam import AttentionSession, StatsCollector, observe_forward

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

    @property
    def agrees(self) -> bool:
        return all(c.agrees for c in self.comparisons)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "text": self.text, "agreement_factor": self.factor, "agrees": self.agrees,
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


def measure(model, tokenizer, estimate_: LogitEstimate, seq_len: int, factor: float = AGREEMENT_FACTOR) -> Measurement:
    """One forward of ``model`` on ``seq_len`` KJV tokens through the seam; compare with ``estimate_``
    (which must have been made from this model's weights, at this length)."""
    ids = sample_ids(tokenizer, seq_len)
    collector = StatsCollector()
    session = AttentionSession(taps=[collector])
    inputs = {"input_ids": ids}
    if "bert" in type(model).__name__.lower() or getattr(getattr(model, "config", None), "model_type", "") == "bert":
        inputs["attention_mask"] = torch.ones_like(ids)
    observe_forward(model, session, **inputs)
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
    return Measurement(int(ids.shape[1]), f"KJV {MEASURE_TEXT_SPLIT} split", rows, comparisons, factor)
