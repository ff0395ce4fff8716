"""What each attention head does: previous-token, induction (copying) and first-token sink scores.

All three are measured on attention probabilities captured through attnkit's seam
(``attnkit.seam.attach`` with a ``MapCapture``), so they work on any model the seam reaches.

- previous-token score: on natural text, mean attention from position i to i-1 (i >= 2);
- sink mass: on the same text, mean attention from position i to position 0 (i >= 2). Blocks
  start mid-sentence, so attention there is to a position, not to a meaningful token;
- induction score (Olsson et al., 2022): on ``[first] + r + r`` where ``r`` is a sequence of
  uniformly random tokens, mean attention from each token of the second copy to the token
  that followed its earlier occurrence. Random tokens leave copying as the only way to predict
  the second half, which ``copy_gain`` shows at the level of the model's loss.

Position 0 and 1 are left out of the first two scores because there the previous token and
the first token coincide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attnkit.seam import AttentionSession, MapCapture, observe_forward

ROLES = ("previous_token", "induction", "sink")


@dataclass
class HeadScore:
    layer: int
    head: int
    previous_token: float
    induction: float
    sink: float


@dataclass
class HeadRoles:
    heads: list[HeadScore]
    first_half_loss: float  # model loss (nats) on the first copy of the random sequence
    second_half_loss: float  # ... and on the second copy: much lower means in-context copying
    repeat_length: int
    text_tokens: int
    chance: dict[str, float]  # each score under uniform causal attention: what "no role" looks like

    @property
    def copy_gain(self) -> float:
        return self.first_half_loss - self.second_half_loss

    def best(self, role: str) -> HeadScore:
        return max(self.heads, key=lambda h: getattr(h, role))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["copy_gain"] = self.copy_gain
        d["best"] = {role: {"layer": self.best(role).layer, "head": self.best(role).head} for role in ROLES}
        return d


def _capture(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, list[int]], torch.Tensor]:
    capture = MapCapture()
    # observe_forward: eval mode and no_grad (not inference_mode: the seam reads tensor version
    # counters), the model's training mode restored also when the forward raises.
    out = observe_forward(model, AttentionSession([capture]), input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    # Keyed by layer number: role scores are for single-stack language models.
    maps = {site.layer: p for site, p in capture.maps.items()}
    head_ids = {site.layer: h for site, h in capture.head_ids.items()}
    return maps, head_ids, out.logits


def repeated_random_tokens(
    vocab_size: int, repeat_length: int, batch: int, first_token: int | None, seed: int, exclude: set[int] | None = None
) -> torch.Tensor:
    """(batch, 1 + 2 * repeat_length) of ``[first] + r + r``; ``first`` defaults to a random token."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([t for t in range(vocab_size) if t not in (exclude or set())])
    r = allowed[torch.randint(0, allowed.numel(), (batch, repeat_length), generator=g)]
    first = allowed[torch.randint(0, allowed.numel(), (batch, 1), generator=g)] if first_token is None else torch.full((batch, 1), first_token)
    return torch.cat([first, r, r], dim=1)


def measure_head_roles(
    model: torch.nn.Module,
    text_ids: torch.Tensor,
    vocab_size: int,
    first_token: int | None = None,
    repeat_length: int = 64,
    batch: int = 8,
    seed: int = 0,
    exclude: set[int] | None = None,
) -> HeadRoles:
    """Score every head of ``model`` on ``text_ids`` (B, T) of natural text and on repeated random tokens."""
    from attnkit.common.tokenize import max_positions

    context = max_positions(model)
    if context is not None and 1 + 2 * repeat_length > context:
        raise ValueError(f"repeat_length {repeat_length} gives {1 + 2 * repeat_length} tokens; the model takes "
                         f"{context}: use at most {(context - 1) // 2}")
    maps, head_ids, _ = _capture(model, text_ids)
    scores: dict[tuple[int, int], dict[str, float]] = {}
    T = text_ids.size(1)
    q = torch.arange(2, T)
    # Uniform causal attention gives query i a weight of 1 / (i + 1) on every key.
    chance = {"previous_token": float((1.0 / (q + 1)).mean()), "sink": float((1.0 / (q + 1)).mean())}
    for layer, p in maps.items():  # p: (B, H, Q, K)
        prev = p[:, :, q, q - 1].mean(dim=(0, 2))
        sink = p[:, :, q, 0].mean(dim=(0, 2))
        for i, h in enumerate(head_ids[layer]):
            scores[(layer, h)] = {"previous_token": float(prev[i]), "sink": float(sink[i])}

    L = repeat_length
    ids = repeated_random_tokens(vocab_size, L, batch, first_token, seed, exclude)
    maps, head_ids, logits = _capture(model, ids)
    # Query at 1 + L + j (second copy of r_j) should look at 2 + j (what followed r_j the first time).
    q = torch.arange(1 + L, 1 + 2 * L)
    k = q - L + 1
    chance["induction"] = float((1.0 / (q + 1)).mean())
    for layer, p in maps.items():
        ind = p[:, :, q, k].mean(dim=(0, 2))
        for i, h in enumerate(head_ids[layer]):
            scores.setdefault((layer, h), {"previous_token": float("nan"), "sink": float("nan")})["induction"] = float(ind[i])

    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")  # (B, 2L)
    # nll[:, t] predicts token t + 1: first copy is tokens 2..L (t = 1..L-1), second copy tokens L+2..2L.
    first_half = float(nll[:, 1:L].mean())
    second_half = float(nll[:, L + 1 :].mean())
    heads = [HeadScore(layer=l, head=h, induction=s.get("induction", float("nan")), previous_token=s["previous_token"], sink=s["sink"])
             for (l, h), s in sorted(scores.items())]
    return HeadRoles(heads, first_half, second_half, L, int(text_ids.numel()), chance)
