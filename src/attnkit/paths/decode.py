"""Multi-path collaborative decoding (M3PO) for any Hugging Face causal LM, and its training forward.

N paths per prompt are decoded together in one KV-cached batch ``(B * N, ...)``, prompt b's paths
contiguous (the layout of ``generate(num_return_sequences=N)``). At every step t, while paths think:

    p_i   = softmax(logits_i)                      the paths' next-token distributions  (B, N, V)
    x_i   ~ softmax(logits_i / tau)                each path samples its own token
    A     = path_weights(S(p), active, T)          S: a registered similarity           (B, N, N)
    in_i  = (1 - λ) e(x_i) + λ Σ_j A_ij e(x_j)     the next input embedding of path i

A path is active while it thinks: the step that samples ``think_end_id`` (or EOS) feeds that token
unblended and the path neither gives nor receives weight afterwards. Test-time decoding in M3PO is
single-path: ``n_paths=1`` (or λ = 0) is plain sampling.

:func:`blended_logprobs` replays the same recursion teacher-forced on sampled completions, with
autograd: the log-probabilities of the blended policy that produced them, whose gradients reach
the model and a learnable similarity's parameters (through A and the blended inputs). It is the
same loop as :func:`generate_paths` (one function, two ways of choosing the token), so the two agree
to rounding; it is sequential in t, as the blend at t+1 needs the distributions at t.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from attnkit.errors import UserError
from attnkit.paths.blend import blend, check_lambda
from attnkit.paths.similarity import make_similarity
from attnkit.paths.weights import WeightStats, path_weights, weight_stats


@dataclass
class PathsOutput:
    prompt_ids: torch.Tensor  # (B*N, P) the prompts, repeated per path
    prompt_mask: torch.Tensor  # (B*N, P)
    completion_ids: torch.Tensor  # (B*N, T) pad after EOS
    completion_mask: torch.Tensor  # (B*N, T) bool: a real token (up to and including EOS)
    blended_mask: torch.Tensor  # (B*N, T) bool: token t was fed to step t+1 blended (its path still thinking)
    logprobs: torch.Tensor  # (B*N, T) log-prob of each token under the sampling distribution; 0 where masked
    n_paths: int
    stats: list[WeightStats] = field(default_factory=list)  # per step that had paths thinking


def resolve_similarity(similarity: str | nn.Module, model: nn.Module, **kwargs) -> nn.Module:
    """A module as given; a name built (learnable ones through the model's embedding unless told otherwise)."""
    if isinstance(similarity, nn.Module):
        return similarity
    from attnkit.paths.similarity import SIMILARITIES

    cls = SIMILARITIES.get(similarity)
    if cls is not None and "embedding" in inspect.signature(cls).parameters and not kwargs:
        kwargs = {"embedding": model.get_input_embeddings()}
    return make_similarity(similarity, **kwargs)


def _check(model: nn.Module, input_ids: torch.Tensor, n_paths: int, temperature: float, lam: float,
           max_new_tokens: int) -> None:
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise UserError(f"{type(model).__name__} has no input embedding (get_input_embeddings): cannot blend paths")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise UserError(f"input_ids must be (batch, prompt_length) with a non-empty prompt, got {tuple(input_ids.shape)}")
    if n_paths < 1:
        raise UserError(f"n_paths must be at least 1, got {n_paths}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature > 0:
        raise UserError(f"the similarity temperature must be positive, got {temperature}")
    check_lambda(lam)


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns); older ones know only the old."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out) -> object:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _rollout(model: nn.Module, sim: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             choose: Callable[[torch.Tensor, int], torch.Tensor], *, n_paths: int, lam: float, temperature: float,
             think_end_id: int | None, eos_token_id: int | None, pad_token_id: int, max_new_tokens: int,
             sample_temperature: float, detach_distributions: bool = False) -> PathsOutput:
    b, plen = input_ids.shape
    n = n_paths
    ids = input_ids.repeat_interleave(n, 0)  # (BN, P)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).repeat_interleave(n, 0)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding: positions count real tokens only
    embed = model.get_input_embeddings()
    cache_kw = _cache_keyword(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache, logits = _cache_of(out), out.logits[:, -1]  # (BN, V)
    next_pos = pos[:, -1:] + 1  # (BN, 1)
    thinking = torch.ones(b * n, dtype=torch.bool, device=ids.device)
    finished = torch.zeros_like(thinking)
    toks, lps, real, mixed, stats = [], [], [], [], []
    for t in range(max_new_tokens):
        logits = logits.float()
        x = torch.where(finished, torch.full_like(thinking, pad_token_id, dtype=torch.long), choose(logits, t))  # (BN,)
        lp = torch.log_softmax(logits / sample_temperature, -1).gather(-1, x[:, None]).squeeze(-1)
        toks.append(x)
        lps.append(lp.masked_fill(finished, 0.0))
        real.append(~finished)
        if eos_token_id is not None:
            finished = finished | (x == eos_token_id)
        ends = (x == think_end_id) if think_end_id is not None else torch.zeros_like(thinking)
        thinking = thinking & ~finished & ~ends  # the marker itself enters unblended
        mixed.append(thinking.clone())
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        e = embed(x[:, None])[:, 0]  # (BN, D)
        inp = e
        if bool((thinking.view(b, n).sum(-1) >= 2).any()):  # some group has two paths still thinking
            p = torch.softmax(logits, -1).view(b, n, -1)  # (B, N, V)
            if detach_distributions:  # no graph through S(p): at V = 150k JSD would keep O(N^2 V) per step
                p = p.detach()
            s = sim(p)  # (B, N, N)
            a = path_weights(s, thinking.view(b, n), temperature)
            inp = blend(e.view(b, n, -1), a, lam).view(b * n, -1)
            stats.append(weight_stats(a, s, thinking.view(b, n)))
        mask = torch.cat([mask, mask.new_ones(b * n, 1)], dim=-1)
        out = model(inputs_embeds=inp[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{cache_kw: cache})
        cache, logits = _cache_of(out), out.logits[:, -1]
        next_pos = next_pos + 1
    steps = len(toks)

    def stack(xs: list[torch.Tensor], fill) -> torch.Tensor:
        y = torch.stack(xs, dim=1)  # (BN, steps)
        if steps < max_new_tokens:  # stopped early: every path finished
            pad = torch.full((b * n, max_new_tokens - steps), fill, dtype=y.dtype, device=y.device)
            y = torch.cat([y, pad], dim=1)
        return y

    return PathsOutput(ids, mask[:, :plen], stack(toks, pad_token_id), stack(real, False), stack(mixed, False),
                       stack(lps, 0.0), n, stats)


@torch.no_grad()
def generate_paths(model: nn.Module, input_ids: torch.Tensor, *, n_paths: int = 4,
                   similarity: str | nn.Module = "cosine", lam: float = 0.1, temperature: float = 0.1,
                   think_end_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
                   max_new_tokens: int = 64, do_sample: bool = True, sample_temperature: float = 1.0,
                   attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   similarity_kwargs: dict | None = None) -> PathsOutput:
    """Decode ``n_paths`` blended paths per prompt of ``input_ids (B, P)`` (left-padded if padded).

    Sampling draws from ``generator`` (or torch's global generator, as ``model.generate`` does): with
    λ = 0 this is exactly ``model.generate(do_sample=True, num_return_sequences=n_paths, top_k=None)``.
    The model is put in eval mode for the call and left as it was found.
    """
    _check(model, input_ids, n_paths, temperature, lam, max_new_tokens)
    if not sample_temperature > 0:
        raise UserError(f"sample_temperature must be positive, got {sample_temperature}")
    sim = resolve_similarity(similarity, model, **(similarity_kwargs or {}))

    def choose(logits: torch.Tensor, t: int) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / sample_temperature, -1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    was_training = model.training
    model.eval()
    try:
        return _rollout(model, sim, input_ids, attention_mask, choose, n_paths=n_paths, lam=lam,
                        temperature=temperature, think_end_id=think_end_id, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id if pad_token_id is not None else (eos_token_id or 0),
                        max_new_tokens=max_new_tokens, sample_temperature=sample_temperature)
    finally:
        model.train(was_training)


def blended_logprobs(model: nn.Module, similarity: str | nn.Module, prompt_ids: torch.Tensor,
                     completion_ids: torch.Tensor, *, n_paths: int, lam: float = 0.1, temperature: float = 0.1,
                     think_end_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int = 0,
                     sample_temperature: float = 1.0, prompt_mask: torch.Tensor | None = None,
                     detach_distributions: bool = False) -> PathsOutput:
    """Teacher-forced log-probs ``(B*N, T)`` of ``completion_ids`` under the blended policy, with gradients.

    ``prompt_ids (B, P)`` are the distinct prompts (each repeated ``n_paths`` times inside, as in
    decoding); ``completion_ids (B*N, T)`` come from :func:`generate_paths`. Runs in the model's current
    mode, with autograd as the caller has it (dropout, if the model has any, makes it differ from decoding).
    ``detach_distributions=True`` stops the gradient from flowing through S(p) into the model's logits:
    the blend weights then act as constants for the model (a learnable similarity still gets its
    gradient through the blended inputs), and a parameter-free similarity keeps no autograd memory.
    """
    _check(model, prompt_ids, n_paths, temperature, lam, max(1, completion_ids.shape[-1]))
    if completion_ids.shape[0] != prompt_ids.shape[0] * n_paths:
        raise UserError(f"{completion_ids.shape[0]} completions for {prompt_ids.shape[0]} prompts x {n_paths} paths")
    sim = resolve_similarity(similarity, model)
    return _rollout(model, sim, prompt_ids, prompt_mask, lambda logits, t: completion_ids[:, t], n_paths=n_paths,
                    lam=lam, temperature=temperature, think_end_id=think_end_id, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id, max_new_tokens=completion_ids.shape[-1],
                    sample_temperature=sample_temperature, detach_distributions=detach_distributions)
