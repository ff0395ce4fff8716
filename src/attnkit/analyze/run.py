"""``analyze``: run a model on text through the seam and turn its attention into statistics and issues."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from attnkit.analyze.diagnose import Issue, diagnose
from attnkit.analyze.mitigations import Mitigation, find_mitigations
from attnkit.errors import UserError
from attnkit.seam import AttentionSession, NoAttentionError, StatsCollector, observe_forward

SCHEMA_VERSION = "1.1"  # 1.1: heads carry "stack" and "kind" beside "layer"
MIN_TOKENS = 2  # fewest tokens analyze accepts: below this no attention row has a choice to make


@dataclass
class Analysis:
    model: str
    dtype: torch.dtype
    tokens: int
    batch: int
    heads: list[dict]
    issues: list[Issue]
    mitigations: list[Mitigation]
    call_order: list[int]
    sample_rows: int | None = None
    token_text: list[str] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)  # attnkit.edits gates: mean gate / share below 0.1 per head

    @property
    def layers(self) -> list[int]:
        return sorted({h["layer"] for h in self.heads})

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "dtype": str(self.dtype).replace("torch.", ""),
            "tokens": self.tokens,
            "batch": self.batch,
            "sample_rows": self.sample_rows,
            "num_layers": len(self.layers),
            "layers": self.layers,
            "mitigations": [m.detail for m in self.mitigations],
            "heads": [_finite(h) for h in self.heads],
            "issues": [i.to_dict() for i in self.issues],
            **({"gates": [_finite(g) for g in self.gates]} if self.gates else {}),  # only for a gated model
        }


def _finite(d: dict) -> dict:
    """JSON has no NaN or Infinity: those become null / strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and v != v:
            out[k] = None
        elif isinstance(v, float) and v in (float("inf"), float("-inf")):
            out[k] = "inf" if v > 0 else "-inf"
        else:
            out[k] = v
    return out


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize(tokenizer, text: str, max_length: int | None, model_max: int | None, truncate_silently: bool = False):
    """Token ids for ``text``; a clear error for empty or over-long input."""
    if not text or not text.strip():
        raise UserError("the text is empty; give --text or --text-file with some words in it")
    enc = tokenizer(text, return_tensors="pt", truncation=False)
    n = enc["input_ids"].shape[1]
    if n == 0:
        raise UserError("the text produced no tokens")
    limit = max_length if max_length is not None else model_max
    if max_length is not None and model_max is not None and max_length > model_max:
        raise UserError(f"--max-length {max_length} is more than the model takes ({model_max} positions)")
    if limit is not None and n > limit:
        if max_length is None and not truncate_silently:
            raise UserError(
                f"the text is {n} tokens but the model takes at most {model_max}; "
                f"pass --max-length {model_max} to analyse the first {model_max} tokens"
            )
        enc = {k: v[:, :limit] for k, v in enc.items()}
    kept = enc["input_ids"].shape[1]
    if kept < MIN_TOKENS:
        # One token is one row seeing one key: every statistic would be NaN and every check silent.
        cut = f" after --max-length {max_length}" if max_length is not None and kept < n else ""
        raise UserError(f"the input is {kept} token{'s' if kept != 1 else ''}{cut}; attention statistics need "
                        f"at least {MIN_TOKENS} tokens (a query must see two keys), so give a longer text")
    return dict(enc)


def analyze(
    model: nn.Module,
    inputs: dict,
    *,
    name: str = "model",
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
) -> Analysis:
    """Per-head statistics and diagnoses for one forward of ``model`` on ``inputs``.

    The model is left as it was found (training mode, attention implementation).
    """
    collector = StatsCollector()
    session = AttentionSession(taps=[collector], layers=layers, heads=heads, sample_rows=sample_rows, seed=seed)
    mask = inputs.get("attention_mask")
    if mask is not None:
        session.query_mask = mask.bool()
    from attnkit.edits.gating import GateStats, find_gates

    gate_stats = GateStats(model) if find_gates(model) else None
    if gate_stats is None:
        observe_forward(model, session, **inputs)
    else:
        with gate_stats:
            observe_forward(model, session, **inputs)
    if not collector.layers:
        if layers is not None:
            raise UserError(f"none of the selected layers {sorted(layers)} ran; the model has layers {sorted({site.layer for site in session.sites_seen})}")
        raise NoAttentionError(f"{type(model).__name__} ran no attention call attnkit could see")
    dtype = next(iter(collector.dtypes.values()))
    call_order = [site.layer for site in collector.call_order]
    config = getattr(model, "config", None)
    mitigations = find_mitigations(config) if config is not None else []
    head_stats = collector.heads()
    ids = inputs.get("input_ids")
    return Analysis(
        model=name,
        dtype=dtype,
        tokens=int(ids.shape[1]) if ids is not None else 0,
        batch=int(ids.shape[0]) if ids is not None else 0,
        heads=head_stats,
        issues=diagnose(head_stats, dtype, mitigations, call_order),
        mitigations=mitigations,
        call_order=call_order,
        sample_rows=sample_rows if collector.sampled else None,
        gates=gate_stats.heads() if gate_stats is not None else [],
    )
