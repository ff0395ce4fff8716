"""Streamed per-head statistics: running sums over batch and query rows, never an n x n map.

``HeadStatsAccumulator.update`` takes one chunk of rows of one attention call and folds it into
per-head sums; ``summary()`` turns the sums into per-head means and extremes. Everything here
is a pure function of the tensors it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.metrics import rows as R
from attnkit.metrics.fused import RowStats
from attnkit.metrics.interval import ratio_mean_ci95

SPIKE_THRESHOLD = 0.95  # a row whose largest weight exceeds this is one-hot for practical purposes

# per-head counts: summed over chunks, batches and processes
COUNTS = ("rows", "positions", "total_rows", "nonfinite_rows", "empty_rows", "nonfinite_logits", "nan_logits")

_SUMS = (
    "entropy", "entropy_sq", "normalized_entropy", "effective_keys", "max_attention", "spike",
    "row_std", "max_over_uniform", "sink_mass", "uniform_share", "diagonal_mass",
    "mean_distance", "logit_range", "log10_curvature",
)


@dataclass
class RowChunk:
    """One chunk of query rows of one attention call, already softmaxed.

    logits: (B, H, R, K) float32, pre-softmax, -inf where masked
    probs: (B, H, R, K) float32
    allowed: bool, broadcastable to (B, H, R, K)
    query_positions: (R,) key index each query row sits at
    row_valid: (B, R) bool, False for padding queries
    query_norm: (B, H, R); key_norm_max: (B, H); scale: the softmax scale
    qk_absmax: (B, H, R) largest |q.k| before scaling over visible keys (overflow check)
    logit_max / logit_min: optional (B, H, R), the largest / smallest logit over visible keys
        (-inf / +inf for rows that see nothing, NaN where a visible logit is NaN), for a
        producer that has them already; they must equal ``rows.logit_extremes(logits, allowed)``
    rows_sum_below_one: the model has learned sinks (gpt-oss): each row's weights over the keys
        sum to what the sink leaves, and the spread of a row is measured around that mass
    """

    logits: Tensor
    probs: Tensor
    allowed: Tensor
    query_positions: Tensor
    row_valid: Tensor
    query_norm: Tensor
    key_norm_max: Tensor
    scale: float
    qk_absmax: Tensor
    logit_max: Tensor | None = None
    logit_min: Tensor | None = None
    rows_sum_below_one: bool = False  # a learned sink takes part of each row (gpt-oss)


class HeadStatsAccumulator:
    """Running per-head sums for one layer."""

    def __init__(self, num_heads: int, device: torch.device | str = "cpu") -> None:
        self.num_heads = num_heads
        z = lambda: torch.zeros(num_heads, dtype=torch.float64, device=device)  # noqa: E731
        self.sums = {k: z() for k in _SUMS}
        self.rows = z()  # rows with >= 2 visible keys and finite logits
        self.positions = z()  # query positions those rows sit at, one per chunk row whatever the batch
        self.total_rows = z()  # all real query rows: valid rows that see at least one key
        self.nonfinite_rows = z()
        # valid rows that see no key after every mask and modifier (a score modifier's -inf hides
        # a key, as in FlexAttention): their output is zero, as FlexAttention's is, not NaN
        self.empty_rows = z()
        self.nonfinite_logits = z()
        self.nan_logits = z()
        self.logit_max = torch.full((num_heads,), -math.inf, dtype=torch.float64, device=device)
        self.logit_min = torch.full((num_heads,), math.inf, dtype=torch.float64, device=device)
        self.qk_absmax = torch.zeros(num_heads, dtype=torch.float64, device=device)
        self.log10_curvature_max = torch.full((num_heads,), -math.inf, dtype=torch.float64, device=device)
        self.sampled_rows_of: int | None = None  # set when rows are a sample: rows available per sequence
        # Per sequence (batch row) of every forward: the entropy summed over its counted rows and
        # their number, (N, H) each, for the interval over sequences. The forward being observed
        # is "open" (its batch may arrive in several chunks) until ``close_sequences``.
        self._seq_entropy: list[Tensor] = []
        self._seq_rows: list[Tensor] = []
        self._open: tuple[Tensor, Tensor] | None = None

    def update(self, c: RowChunk) -> None:
        """Fold a chunk given with its probabilities (the reference path; see ``update_rows``)."""
        # One pass per reduction over the (B, H, R, K) chunk and no masked copies of it: the
        # row extremes come from one fused min/max, the finiteness of a row from reductions
        # that are needed anyway (a NaN or inf shows in them), and the exact per-key counts of
        # non-finite logits are only taken when some real row may hold one.
        shape = c.probs.shape
        allowed = c.allowed
        probs, logits = c.probs, c.logits
        n_visible = R.visible_keys(allowed, shape)  # (B, H, R)
        real = c.row_valid[:, None, :].expand(shape[:-1]) & (n_visible >= 1)

        if c.logit_max is not None and c.logit_min is not None:
            lmax, lmin = c.logit_max, c.logit_min
        else:
            lmax, lmin = R.logit_extremes(logits, allowed)  # over visible keys; NaN propagates
        max_p = R.max_probability(probs)  # NaN / +inf in a row shows here ...
        sum_sq = R.sum_sq(probs)  # ... and -inf here
        maybe_nonfinite = ~(torch.isfinite(lmax) & torch.isfinite(lmin) & torch.isfinite(max_p) & torch.isfinite(sum_sq))
        nonfinite = nans = finite = None
        if bool((real & maybe_nonfinite).any()):
            visible_logits = torch.where(allowed, logits, 0.0)
            finite_logits = torch.isfinite(visible_logits)
            finite = finite_logits.all(-1) & torch.isfinite(probs).all(-1)
            nonfinite = (~finite_logits).sum(-1)
            nans = torch.isnan(visible_logits).sum(-1)
        stats = RowStats(
            n_visible=n_visible, logit_max=lmax, logit_min=lmin,
            entropy=R.entropy(probs), max_prob=max_p, sum_sq=sum_sq,
            sink_mass=R.sink_mass(probs, allowed),
            diagonal_mass=R.diagonal_mass(probs, c.query_positions),
            mean_distance=R.mean_distance(probs, c.query_positions),
            nonfinite_logits=nonfinite, nan_logits=nans, finite=finite,
            row_mass=probs.sum(-1) if c.rows_sum_below_one else None,
        )
        self.update_rows(stats, c.row_valid, c.query_norm, c.key_norm_max, c.scale, c.qk_absmax)

    def update_rows(
        self, s: RowStats, row_valid: Tensor, query_norm: Tensor, key_norm_max: Tensor, scale: float,
        qk_absmax: Tensor | None = None,
    ) -> None:
        """Fold per-row statistics of one chunk (``RowStats``, e.g. from ``fused.row_stats``).

        row_valid: (B, R) bool, False for padding queries; query_norm, qk_absmax: (B, H, R);
        key_norm_max: (B, H); scale: the softmax scale; qk_absmax defaults to ``s.qk_absmax``. Rows that do not count are not zeroed
        first: every statistic is row-local and they are dropped below.
        """
        n_visible, lmax, lmin, max_p = s.n_visible, s.logit_max, s.logit_min, s.max_prob
        qk_absmax = s.qk_absmax if qk_absmax is None else qk_absmax
        valid = row_valid[:, None, :].expand(n_visible.shape)
        real = valid & (n_visible >= 1)
        self.total_rows += real.sum((0, 2)).double()
        self.empty_rows += (valid & (n_visible == 0)).sum((0, 2)).double()
        if s.nonfinite_logits is not None:
            finite_row = s.finite if s.finite is not None else s.nonfinite_logits == 0
            self.nonfinite_rows += (real & ~finite_row).sum((0, 2)).double()
            self.nonfinite_logits += (s.nonfinite_logits * real).sum((0, 2)).double()
            self.nan_logits += (s.nan_logits * real).sum((0, 2)).double()
            ok = real & finite_row
        else:  # the producer found every real row finite: nothing to count
            ok = real

        use = ok & (n_visible >= 2)
        w = use.double()
        self.rows += w.sum((0, 2))
        self.positions += use.any(0).sum(-1).double()
        entropy = s.entropy
        self._add_sequences(torch.where(use, entropy.double(), 0.0).sum(-1), w.sum(-1))
        if not bool(use.any()):
            self._update_extremes(row_valid, lmax, lmin, qk_absmax)
            return

        n = n_visible.clamp_min(1)
        logit_range = torch.where(use, lmax - lmin, 0.0)
        values = {
            "entropy": entropy,
            "entropy_sq": entropy * entropy,
            "normalized_entropy": R.normalized_entropy(entropy, n),
            "effective_keys": R.effective_keys(entropy),
            "max_attention": max_p,
            "spike": (max_p > SPIKE_THRESHOLD).to(max_p.dtype),
            "row_std": R.std_from_sum_sq(s.sum_sq, n, s.row_mass),
            "max_over_uniform": max_p * n,
            "sink_mass": s.sink_mass,
            "uniform_share": 1.0 / n.to(max_p.dtype),
            "diagonal_mass": s.diagonal_mass,
            "mean_distance": s.mean_distance,
            "logit_range": logit_range,
            "log10_curvature": R.log10_curvature(query_norm, key_norm_max[..., None], scale, logit_range),
        }
        totals = torch.where(use, torch.stack([values[k].double() for k in _SUMS]), 0.0).sum((1, 3))
        for i, key in enumerate(_SUMS):
            self.sums[key] += totals[i]
        curv = torch.where(use, values["log10_curvature"], -math.inf)
        self.log10_curvature_max = torch.maximum(self.log10_curvature_max, curv.double().amax((0, 2)))
        self._update_extremes(row_valid, lmax, lmin, qk_absmax)

    def _add_sequences(self, entropy: Tensor, rows: Tensor) -> None:
        """Fold (B, H) per-sequence entropy sums and row counts of a chunk into the open forward."""
        if self._open is not None and self._open[0].shape != entropy.shape:
            self.close_sequences()  # another batch shape: another forward
        if self._open is None:
            self._open = (entropy.clone(), rows.clone())
        else:
            self._open[0].add_(entropy)
            self._open[1].add_(rows)

    def close_sequences(self) -> None:
        """End of a forward: its sequences join the closed ones (the statistics tap calls this)."""
        if self._open is not None:
            self._seq_entropy.append(self._open[0].cpu())
            self._seq_rows.append(self._open[1].cpu())
            self._open = None

    def sequence_sums(self) -> tuple[Tensor, Tensor]:
        """(N, H) float64 entropy sums and row counts of every sequence seen, the open forward's included."""
        entropy = self._seq_entropy + ([self._open[0].cpu()] if self._open is not None else [])
        rows = self._seq_rows + ([self._open[1].cpu()] if self._open is not None else [])
        if not entropy:
            empty = torch.zeros(0, self.num_heads, dtype=torch.float64)
            return empty, empty.clone()
        return torch.cat(entropy), torch.cat(rows)

    def set_sequence_sums(self, entropy: Tensor, rows: Tensor) -> None:
        """Replace every sequence's sums (N, H) with the given ones (after gathering them across processes)."""
        self._open = None
        self._seq_entropy, self._seq_rows = [entropy.double().cpu()], [rows.double().cpu()]

    def _update_extremes(self, row_valid: Tensor, row_max: Tensor, row_min: Tensor, qk_absmax: Tensor) -> None:
        # Extremes include rows with a single visible key and rows that went non-finite in
        # the probabilities: an overflowing logit must show up here.
        real = row_valid[:, None, :].expand(row_max.shape)
        lmax = torch.where(real, row_max, -math.inf)
        lmin = torch.where(real, row_min, math.inf)
        finite_max = torch.where(torch.isfinite(lmax) | (lmax == math.inf), lmax, -math.inf)
        self.logit_max = torch.maximum(self.logit_max, finite_max.double().amax((0, 2)))
        self.logit_min = torch.minimum(self.logit_min, torch.nan_to_num(lmin, nan=math.inf, posinf=math.inf, neginf=-math.inf).double().amin((0, 2)))
        qk = torch.where(real, torch.nan_to_num(qk_absmax, nan=0.0, posinf=math.inf), 0.0)  # NaN is counted apart
        self.qk_absmax = torch.maximum(self.qk_absmax, qk.double().amax((0, 2)))

    def merge(self, other: "HeadStatsAccumulator") -> None:
        """Fold another accumulator (another batch, another process) into this one."""
        for k in _SUMS:
            self.sums[k] += other.sums[k]
        for k in COUNTS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.logit_max = torch.maximum(self.logit_max, other.logit_max)
        self.logit_min = torch.minimum(self.logit_min, other.logit_min)
        self.qk_absmax = torch.maximum(self.qk_absmax, other.qk_absmax)
        self.log10_curvature_max = torch.maximum(self.log10_curvature_max, other.log10_curvature_max)
        if self.sampled_rows_of is None:  # sampled rows on either side make the merged means a sample
            self.sampled_rows_of = other.sampled_rows_of
        self.close_sequences()
        entropy, rows = other.sequence_sums()
        self._seq_entropy.append(entropy)
        self._seq_rows.append(rows)

    def summary(self) -> list[dict[str, float]]:
        """Per-head means (over rows that see >= 2 keys) and extremes, as plain floats.

        ``entropy_ci95`` is the 95% interval of the mean entropy over sequences (each batch row of
        each forward is one sequence; ``metrics.interval.ratio_mean_ci95``): ``[lo, hi]``, or None
        with fewer than two sequences that have counted rows. ``sequences`` is how many do.
        """
        rows = self.rows.clamp_min(1)
        seq_entropy, seq_rows = self.sequence_sums()  # (N, H)
        out = []
        for h in range(self.num_heads):
            ci = ratio_mean_ci95(seq_entropy[:, h], seq_rows[:, h])
            mean = {k: float(self.sums[k][h] / rows[h]) for k in _SUMS}
            n = float(self.rows[h])
            var = max(mean["entropy_sq"] - mean["entropy"] ** 2, 0.0)
            stats = {
                "entropy": mean["entropy"],
                "entropy_std": math.sqrt(var),
                "normalized_entropy": mean["normalized_entropy"],
                "effective_keys": mean["effective_keys"],
                "max_attention": mean["max_attention"],
                "spike_fraction": mean["spike"],
                "row_std": mean["row_std"],
                "max_over_uniform": mean["max_over_uniform"],
                "sink_mass": mean["sink_mass"],
                "sink_uniform_share": mean["uniform_share"],
                "sink_ratio": mean["sink_mass"] / max(mean["uniform_share"], 1e-12),
                "diagonal_mass": mean["diagonal_mass"],
                "mean_distance": mean["mean_distance"],
                "logit_max": float(self.logit_max[h]),
                "logit_min": float(self.logit_min[h]),
                "logit_range": mean["logit_range"],
                "qk_absmax": float(self.qk_absmax[h]),
                "log10_curvature": mean["log10_curvature"],
                "log10_curvature_max": float(self.log10_curvature_max[h]),
                "entropy_ci95": list(ci) if ci is not None else None,
                "sequences": int((seq_rows[:, h] > 0).sum()),
                "rows": n,
                "nonfinite_rows": float(self.nonfinite_rows[h]),
                "empty_rows": float(self.empty_rows[h]),
                "nonfinite_logits": float(self.nonfinite_logits[h]),
                "nan_logits": float(self.nan_logits[h]),
            }
            if n == 0:
                for k in ("entropy", "entropy_std", "normalized_entropy", "effective_keys", "max_attention",
                          "spike_fraction", "row_std", "max_over_uniform", "sink_mass", "sink_uniform_share",
                          "sink_ratio", "diagonal_mass", "mean_distance", "logit_range", "log10_curvature"):
                    stats[k] = math.nan
            if self.sampled_rows_of is not None and n > 1:
                # Standard error of the mean entropy when query positions are a random sample:
                # std / sqrt(positions). The sampled positions are shared by every sequence of the
                # batch and rows at one position are strongly correlated, so positions, not rows,
                # are the sample size. Conservative: no finite-population correction.
                stats["entropy_stderr"] = math.sqrt(var / max(float(self.positions[h]), 1.0))
            out.append(stats)
        return out
