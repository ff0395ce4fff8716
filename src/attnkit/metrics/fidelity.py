"""How close a changed model is to the original: pure functions of logits, probabilities and gradients.

Used by ``attnkit sparse eval`` (sparse against dense attention) and by anything else that
replaces part of a model and wants to know what it cost. Conventions:

- logits: (B, T, V); token ids: (B, T); ``valid``: (B, T) bool, False for padding (None = all).
- "next-token" metrics compare the distributions at every valid position; accuracy and
  perplexity score position t's distribution against token t+1 (both valid).
- attention probabilities: (B, H, R, K) rows of a map, ``allowed`` the keys a row may see.

Everything is reduced in float64, so a KL of 1e-6 between two float32 models is not rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _valid(valid: Tensor | None, shape: torch.Size, device) -> Tensor:
    return torch.ones(shape, dtype=torch.bool, device=device) if valid is None else valid.to(torch.bool)


def next_token_kl_terms(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """(B, T) KL(P_teacher || P_student) of each position's next-token distribution, in nats, float64."""
    lp = F.log_softmax(teacher_logits.double(), dim=-1)
    lq = F.log_softmax(student_logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def next_token_kl(teacher_logits: Tensor, student_logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over valid positions of KL(P_teacher || P_student) (0-dim float64; 0 when nothing is valid)."""
    kl = next_token_kl_terms(teacher_logits, student_logits)
    v = _valid(valid, kl.shape, kl.device)
    return (kl * v).sum() / v.sum().clamp_min(1)


def distill_kl(teacher_logits: Tensor, student_logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """``next_token_kl`` in the student's dtype with a gradient to the student: the distillation loss."""
    lq = F.log_softmax(student_logits.float(), dim=-1)
    lp = F.log_softmax(teacher_logits.float(), dim=-1).detach()
    kl = (lp.exp() * (lp - lq)).sum(-1)  # (B, T)
    v = _valid(valid, kl.shape, kl.device)
    return (kl * v).sum() / v.sum().clamp_min(1)


def _targets(logits: Tensor, ids: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(logits of positions 0..T-2, their next tokens, which pairs count)."""
    v = _valid(valid, ids.shape, ids.device)
    return logits[:, :-1], ids[:, 1:], v[:, :-1] & v[:, 1:]


def next_token_nll(logits: Tensor, ids: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood (nats) of each valid next token (0-dim float64)."""
    lg, tgt, v = _targets(logits, ids, valid)
    nll = F.cross_entropy(lg.double().flatten(0, 1), tgt.flatten(), reduction="none").view(tgt.shape)
    return (nll * v).sum() / v.sum().clamp_min(1)


def perplexity(logits: Tensor, ids: Tensor, valid: Tensor | None = None) -> float:
    """exp of ``next_token_nll``."""
    return float(torch.exp(next_token_nll(logits, ids, valid)))


def top1_accuracy(logits: Tensor, ids: Tensor, valid: Tensor | None = None) -> float:
    """Share of valid positions whose most likely next token is the one that follows."""
    lg, tgt, v = _targets(logits, ids, valid)
    hit = (lg.argmax(-1) == tgt) & v
    return float(hit.sum()) / max(1, int(v.sum()))


def top1_agreement(logits_a: Tensor, logits_b: Tensor, valid: Tensor | None = None) -> float:
    """Share of valid positions where both models' most likely next token is the same."""
    v = _valid(valid, logits_a.shape[:-1], logits_a.device)
    same = (logits_a.argmax(-1) == logits_b.argmax(-1)) & v
    return float(same.sum()) / max(1, int(v.sum()))


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two tensors taken as flat vectors, in float64. Two zero vectors agree (1.0); a zero
    vector against a non-zero one does not (0.0)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 1.0 if bool(na == nb) else 0.0
    return float((a @ b) / (na * nb))


def row_cosines(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """(N,) cosine of each row of two (N, D) tensors, float64."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


def mean_pool(hidden: Tensor, valid: Tensor | None = None) -> Tensor:
    """(B, D) mean of each sequence's valid token vectors (sentence-transformers' pooling); a sequence
    with no valid token gives zeros."""
    v = _valid(valid, hidden.shape[:-1], hidden.device).to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * v).sum(1) / v.sum(1).clamp_min(1)


@dataclass
class ProbError:
    """Attention-probability error of a changed map against the original, summed over rows seen.

    For a query row with original probabilities p over the keys it may see and changed ones p̃
    (zero on keys the sparse pattern dropped, renormalised over the kept ones):
    ``sq_kept`` = Σ_kept (p − p̃)², ``sq_dropped`` = Σ_dropped p² (p̃ is 0 there), ``dropped_mass``
    = Σ_dropped p; ``entries`` counts the (row, allowed key) pairs and ``rows`` the rows.
    MSE = (sq_kept + sq_dropped) / entries: the mean squared error over every probability a row
    could have, kept or dropped.
    """

    sq_kept: float = 0.0
    sq_dropped: float = 0.0
    dropped_mass: float = 0.0
    entries: int = 0
    rows: int = 0

    def add(self, p: Tensor, p_changed: Tensor, kept: Tensor, allowed: Tensor, row_valid: Tensor | None = None) -> None:
        """p, p_changed: (B, H, R, K); kept, allowed: bool broadcastable to it; row_valid: (B, R) or None."""
        p, q = p.double(), p_changed.double()
        allowed = allowed.expand_as(p)
        if row_valid is not None:
            allowed = allowed & row_valid[:, None, :, None]
        kept = kept.expand_as(p) & allowed
        dropped = allowed & ~kept
        diff2 = (p - q).square()
        self.sq_kept += float((diff2 * kept).sum())
        self.sq_dropped += float((p.square() * dropped).sum())
        self.dropped_mass += float((p * dropped).sum())
        self.entries += int(allowed.sum())
        self.rows += int(allowed.any(-1).sum())

    def __iadd__(self, other: "ProbError") -> "ProbError":
        for f in ("sq_kept", "sq_dropped", "dropped_mass", "entries", "rows"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self

    @property
    def mse(self) -> float:
        return (self.sq_kept + self.sq_dropped) / max(1, self.entries)

    @property
    def mean_dropped_mass(self) -> float:
        """The share of a row's attention the pattern dropped, averaged over rows."""
        return self.dropped_mass / max(1, self.rows)

    def as_dict(self) -> dict:
        return {"mse": self.mse, "mse_kept": self.sq_kept / max(1, self.entries),
                "mse_dropped": self.sq_dropped / max(1, self.entries), "dropped_mass": self.mean_dropped_mass,
                "entries": self.entries, "rows": self.rows}


def restricted_softmax(logits: Tensor, keep: Tensor) -> Tensor:
    """Softmax of ``logits`` over the keys where ``keep`` is True (rows with none kept are zero), float64."""
    x = logits.double().masked_fill(~keep, float("-inf"))
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = (x - m).exp()
    s = e.sum(-1, keepdim=True)
    return torch.where(s > 0, e / s.clamp_min(1e-300), torch.zeros_like(e))


def smallest_density(points: Sequence[tuple[float, float]], holds: Callable[[float], bool]) -> float | None:
    """The smallest measured density from which a target holds at it and at every larger measured one.

    points: (density, value); ``holds(value)`` says whether the target is met. None when it is not
    met at the largest density measured. (The "every larger" rule keeps one lucky low density from
    being reported when the target fails above it.)
    """
    best = None
    for density, value in sorted(points, key=lambda x: -x[0]):
        if not holds(value):
            break
        best = density
    return best
