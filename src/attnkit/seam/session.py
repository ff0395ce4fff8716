"""The attention session: the one place where attnkit observes, overrides or replaces attention.

Adapters (``hf.py``, ``mha.py``, ``protocol.py``) turn a model's attention calls into an
``AttentionCall`` and hand it to ``AttentionSession.run``. ``run`` either lets the call go to
SDPA untouched (layer not selected, nothing to do), or computes the exact pre-softmax logits
chunk by chunk of query rows, applies score modifiers and pattern overrides, shows each chunk
to the observers, and computes the output itself when anything changed the probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.metrics import rows as rows_lib
from attnkit.metrics.accumulate import RowChunk
from attnkit.seam.mask_cache import LastMaskCache
from attnkit.seam.call import AttentionCall, ObservedChunk, causal_allowed

# A score modifier maps logits (B, H, R, K) float32 to logits, given the rows' key positions (R,).
ScoreMod = Callable[[Tensor, Tensor], Tensor]
# A pattern maps (allowed (B|1, H|1, R, K) bool, query positions (R,), learned probs (B, H, R, K))
# to replacement probabilities that sum to one over allowed keys.
Pattern = Callable[[Tensor, Tensor, Tensor], Tensor]


class Observer:
    """Sees every chunk of every observed call. Subclasses override ``observe``.

    ``accepts_key_prefix``: True when the observer is content with chunks cut to a prefix of
    the keys that holds every key the chunk's rows can see and each row's own position (so
    ``probs.shape[-1]`` may be less than the call's key length). When every observer says so
    and nothing is changed, the session skips the keys a causal row cannot see.
    """

    accepts_key_prefix = False

    def start_forward(self) -> None:  # noqa: B027 - optional hook
        pass

    def observe(self, chunk: ObservedChunk) -> None:
        raise NotImplementedError


class AttentionSession:
    """What to do with attention calls while attached to a model.

    observers: each sees logits and probabilities of the observed heads, chunk by chunk.
    score_mods: applied in order to the logits (temperature, soft-capping, ...).
    pattern: replaces the probabilities (uniform, local window, first token, ...).
    layers / heads: which layers, and which heads of them, are observed and modified; every
        other layer runs on SDPA. ``heads`` is a list for every selected layer, or a dict
        {layer: [heads]}.
    sample_rows: when only observing, compute statistics on this many random query rows per
        call (the output still comes from SDPA over all rows).
    query_mask: (B, Q) bool, False for padding queries, so they do not count in statistics.
    """

    def __init__(
        self,
        observers: Iterable[Observer] = (),
        score_mods: Sequence[ScoreMod] = (),
        pattern: Pattern | None = None,
        layers: Iterable[int] | None = None,
        heads: Sequence[int] | dict[int, Sequence[int]] | None = None,
        sample_rows: int | None = None,
        seed: int = 0,
        chunk_elements: int = 1 << 21,
    ) -> None:
        self.observers = list(observers)
        self.score_mods = list(score_mods)
        self.pattern = pattern
        self.layers = None if layers is None else set(int(x) for x in layers)
        self.heads = heads
        self.sample_rows = sample_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.chunk_elements = chunk_elements
        self.query_mask: Tensor | None = None
        self.layers_seen: list[int] = []
        self._layer_of_module: dict[int, int] = {}
        self._key_need_cache = LastMaskCache()

    # ------------------------------------------------------------------ selection
    def layer_of(self, module: torch.nn.Module) -> int:
        """The module's own ``layer_idx`` when it has one, else the order in which calls arrive."""
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            return idx
        return self._layer_of_module.setdefault(id(module), len(self._layer_of_module))

    def observes(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def head_ids(self, layer: int, num_heads: int) -> list[int]:
        if self.heads is None:
            return list(range(num_heads))
        chosen = self.heads.get(layer, range(num_heads)) if isinstance(self.heads, dict) else self.heads
        bad = [h for h in chosen if not 0 <= h < num_heads]
        if bad:
            raise ValueError(f"layer {layer} has {num_heads} heads; no head {bad[0]}")
        return list(chosen)

    def start_forward(self) -> None:
        for obs in self.observers:
            obs.start_forward()

    # ------------------------------------------------------------------ the call
    def run(self, call: AttentionCall, sdpa: Callable[[], Tensor] | None) -> Tensor:
        """Return the attention output (B, H, Q, Dv) for ``call``.

        ``sdpa`` computes the unmodified output with the model's usual kernel; None when the
        adapter has none (then attnkit computes it).
        """
        self.layers_seen.append(call.layer)
        if not self.observes(call.layer):
            return sdpa() if sdpa is not None else _plain_sdpa(call)
        modifies = bool(self.score_mods) or self.pattern is not None
        computes_output = modifies or call.softcap is not None or sdpa is None
        if not self.observers and not computes_output:
            return sdpa()

        B, H, Q, _ = call.query.shape
        K = call.key_length
        device = call.query.device
        heads = self.head_ids(call.layer, H)
        all_heads = heads == list(range(H))
        head_index = torch.tensor(heads, device=device)
        # Rows and heads whose logits are computed: all of them when the output is ours.
        q_src = call.query if computes_output or all_heads else call.query[:, head_index]
        k_src = call.key if computes_output or all_heads else call.key[:, head_index]
        rows = torch.arange(Q, device=device)
        sampled = False
        if not computes_output and self.sample_rows is not None and Q > self.sample_rows:
            rows = torch.randperm(Q, generator=self.generator)[: self.sample_rows].sort().values.to(device)
            sampled = True

        allowed_full = call.allowed
        causal_built = allowed_full is None and call.extra.get("is_causal", False)
        if causal_built:
            allowed_full = causal_allowed(Q, K, device)
        bias_full = call.bias
        if q_src.shape[1] != H:  # only the observed heads' logits: per-head masks follow them
            allowed_full, bias_full = _heads_of(allowed_full, head_index), _heads_of(bias_full, head_index)
        row_valid_full = self._row_valid(B, Q, device)
        key_norm_max = k_src.float().norm(dim=-1).amax(-1)  # (B, h)
        out = torch.empty(B, H, Q, call.value.shape[-1], dtype=call.value.dtype, device=device) if computes_output else None
        # Observers that only read statistics get the keys a chunk's rows can see, not all K.
        prefix = (
            not computes_output and allowed_full is not None and bool(self.observers)
            and all(getattr(obs, "accepts_key_prefix", False) for obs in self.observers)
        )
        need = None
        if prefix:
            need = (rows + (K - Q) + 1) if causal_built else self._key_need(allowed_full, Q, K)[rows]

        # Logits are raw * scale and nothing else: their extremes follow from raw's.
        plain = call.softcap is None and not self.score_mods and bias_full is None and call.scale > 0

        for r, k_len in self._chunks(rows, need, B * q_src.shape[1], K):
            q = q_src[:, :, r]  # (B, h, R, D)
            k_part = k_src if k_len == K else k_src[:, :, :k_len]
            raw = torch.matmul(q, k_part.transpose(-1, -2))  # in the model's dtype: fp16 overflow shows
            allowed = _rows_of(allowed_full, r, raw.shape)
            if allowed.shape[-1] != k_len:
                allowed = allowed[..., :k_len]
            all_visible = bool(allowed.all())
            qk_absmax = row_max = row_min = None
            if self.observers and plain:
                # Extremes of raw over visible keys give |q.k| max and, as logits = raw * scale
                # with scale > 0 and rounding monotone, the logits' extremes exactly.
                raw_max, raw_min = rows_lib.logit_extremes(raw, allowed)
                qk_absmax = torch.maximum(raw_max, -raw_min).float().clamp_min(0.0).abs()
                row_max, row_min = raw_max.float().mul_(call.scale), raw_min.float().mul_(call.scale)
            elif self.observers:
                qk_absmax = _visible_absmax(raw, allowed, all_visible)
            logits = raw.float().mul_(call.scale)  # raw is not needed again: scaled in place when float32
            del raw
            if call.softcap is not None:
                logits = call.softcap * torch.tanh(logits / call.softcap)
            positions = r + (K - Q)
            for mod in self.score_mods:
                modded = mod(logits, positions)
                logits = modded if all_heads or not computes_output else _on_heads(logits, modded, head_index)
            if bias_full is not None:
                bias = _rows_of(bias_full, r, logits.shape)
                logits = logits + (bias if bias.shape[-1] == k_len else bias[..., :k_len]).float()
            if not all_visible:
                logits = torch.where(allowed, logits, -math.inf)
            probs = torch.softmax(logits, dim=-1)
            sees = allowed.any(-1, keepdim=True)
            if not bool(sees.all()):
                probs = torch.where(sees, probs, 0.0)  # rows that see nothing
            if self.pattern is not None:
                replaced = self.pattern(allowed, positions, probs)
                probs = replaced if all_heads else _on_heads(probs, replaced, head_index)

            if self.observers:
                sel = slice(None) if (all_heads or not computes_output) else head_index
                obs_allowed = allowed if allowed.shape[1] == 1 else allowed[:, sel]
                stats = RowChunk(
                    logits=logits[:, sel],
                    probs=probs[:, sel],
                    allowed=obs_allowed,
                    query_positions=positions,
                    row_valid=row_valid_full[:, r],
                    query_norm=q.float().norm(dim=-1)[:, sel],
                    key_norm_max=key_norm_max[:, sel],
                    scale=call.scale,
                    qk_absmax=qk_absmax[:, sel],
                    logit_max=None if row_max is None else row_max[:, sel],
                    logit_min=None if row_min is None else row_min[:, sel],
                )
                observed = ObservedChunk(call=call, layer=call.layer, head_ids=heads, rows=r, sampled=sampled, stats=stats)
                for obs in self.observers:
                    obs.observe(observed)

            if out is not None:
                p = F.dropout(probs, p=call.dropout, training=call.module.training) if call.dropout else probs
                out[:, :, r] = torch.matmul(p.to(call.value.dtype), call.value)
        if out is not None:
            return out
        return sdpa()

    def _chunks(self, rows: Tensor, need: Tensor | None, per_row: int, K: int) -> Iterator[tuple[Tensor, int]]:
        """Consecutive groups of ``rows`` with the key prefix each group needs (K without ``need``),
        about ``chunk_elements`` logits a group."""
        budget = self.chunk_elements
        if need is None:
            step = max(1, budget // max(1, per_row * K))
            for start in range(0, rows.numel(), step):
                yield rows[start : start + step], K
            return
        need_of = need.tolist()
        n, start = len(need_of), 0
        while start < n:
            end, k_len = start + 1, need_of[start]
            while end < n:
                k_next = max(k_len, need_of[end])
                if (end - start + 1) * k_next * per_row > budget:
                    break
                k_len, end = k_next, end + 1
            yield rows[start:end], k_len
            start = end

    def _key_need(self, allowed: Tensor, Q: int, K: int) -> Tensor:
        """(Q,) for each query row, the key prefix that holds every key it sees and its own position.

        Models pass one mask to every layer, so the answer is kept for the last mask seen.
        """
        cached = self._key_need_cache.get(allowed, (Q, K))
        if cached is not None:
            return cached
        original = allowed
        if allowed.dim() < 4:
            allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
        seen = allowed.any(1) if allowed.shape[1] > 1 else allowed[:, 0]  # (B|1, Q|1, K)
        seen = seen.any(0) if seen.shape[0] > 1 else seen[0]  # (Q|1, K)
        last = torch.where(seen, torch.arange(1, K + 1, device=allowed.device, dtype=torch.int32), 0).amax(-1)
        own = torch.arange(Q, device=allowed.device) + (K - Q) + 1
        need = torch.maximum(last.to(own.dtype).expand(Q), own).clamp_max(K).cpu()
        self._key_need_cache.put(original, need, (Q, K))
        return need

    def _row_valid(self, B: int, Q: int, device: torch.device) -> Tensor:
        qm = self.query_mask
        if qm is not None and qm.shape == (B, Q):
            return qm.to(device=device, dtype=torch.bool)
        return torch.ones(B, Q, dtype=torch.bool, device=device)


def _rows_of(t: Tensor | None, rows: Tensor, shape: torch.Size) -> Tensor:
    """Rows ``rows`` of a (B|1, H|1, Q|1, K) tensor; all-True when there is no mask."""
    if t is None:
        return torch.ones(1, 1, 1, shape[-1], dtype=torch.bool, device=rows.device)
    return t if t.shape[-2] == 1 else t[:, :, rows]


def _heads_of(t: Tensor | None, head_index: Tensor) -> Tensor | None:
    """The given heads of a (B|1, H|1, Q|1, K) mask or bias; unchanged when it is shared by all heads."""
    return t if t is None or t.shape[1] == 1 else t[:, head_index]


def _visible_absmax(raw: Tensor, allowed: Tensor, all_visible: bool) -> Tensor:
    """(B, H, R) largest |q.k| over visible keys, float32: NaN if a visible one is NaN, 0 for rows that see nothing."""
    if not all_visible:
        raw = torch.where(allowed, raw, 0.0)
    return torch.maximum(raw.amax(-1), -raw.amin(-1)).float().abs()


def _on_heads(base: Tensor, changed: Tensor, head_index: Tensor) -> Tensor:
    """``base`` with the given heads taken from ``changed``."""
    out = base.clone()
    out[:, head_index] = changed[:, head_index]
    return out


def _plain_sdpa(call: AttentionCall) -> Tensor:
    mask = call.allowed
    if call.bias is not None:
        mask = torch.zeros_like(call.bias).masked_fill(~call.allowed, -math.inf) + call.bias
    is_causal = mask is None and bool(call.extra.get("is_causal", False))
    return F.scaled_dot_product_attention(
        call.query, call.key, call.value, attn_mask=mask, is_causal=is_causal,
        dropout_p=call.dropout if call.module.training else 0.0, scale=call.scale,
    )
