"""``analyze`` over a dataset: texts tokenised, cut to a length, padded into batches, run through one ``Analyzer``.

Padding takes no part in the statistics (``Analyzer`` reads the attention mask: padding queries
are left out, padding keys are masked), so batching changes nothing but speed: the statistics of
a padded batch are the row-weighted pool of its sequences analysed one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from attnkit.analyze.run import Analysis, Analyzer
from attnkit.common.distributed import DistEnv, agree, rank_share
from attnkit.errors import UserError


def tokenize_texts(tokenizer, texts: Sequence[str], seq_len: int | None) -> tuple[list[dict[str, list[int]]], int]:
    """Each text's token ids (and the tokenizer's other per-token fields), cut to ``seq_len`` tokens
    with the tokenizer's own truncation (so a closing special token stays); and how many were cut."""
    # One token past seq_len is enough to tell which texts are too long (and no tokenizer warns
    # about a text longer than the model takes: it is cut here, and the report says so).
    limit = {"truncation": True, "max_length": seq_len + 1} if seq_len is not None else {"truncation": False}
    first = tokenizer(list(texts), **limit)
    keys = [k for k in ("input_ids", "token_type_ids") if k in first]
    encoded = [{k: first[k][i] for k in keys} for i in range(len(texts))]
    long = [i for i, e in enumerate(encoded) if seq_len is not None and len(e["input_ids"]) > seq_len]
    if long:
        short = tokenizer([texts[i] for i in long], truncation=True, max_length=seq_len)
        for j, i in enumerate(long):
            encoded[i] = {k: short[k][j] for k in keys}
    return encoded, len(long)


def pad_batch(encoded: Sequence[dict[str, list[int]]], pad_id: int, device: torch.device | str = "cpu") -> dict:
    """Right-padded tensors (B, L) and the attention mask (1 on real tokens): real tokens keep
    positions 0.. as they would alone."""
    longest = max(len(e["input_ids"]) for e in encoded)
    batch: dict[str, torch.Tensor] = {}
    for key in encoded[0]:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([e[key] + [fill] * (longest - len(e[key])) for e in encoded], device=device)
    batch["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * (longest - len(e["input_ids"]))
                                            for e in encoded], device=device)
    return batch


def analyze_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    name: str = "model",
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    sample_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    env: DistEnv | None = None,
) -> Analysis:
    """Per-head statistics and diagnoses pooled over ``texts``, ``batch_size`` sequences a forward.

    Each text is one sequence, cut to ``seq_len`` tokens (None: not cut); texts of similar length
    share a batch (sorted by length) so little is padding. ``progress(done, total)`` is called after
    each batch with this process's sequences done so far.

    ``env``: under ``torchrun`` (``attnkit.common.distributed.command_group``) each rank analyses
    its share of ``texts`` and the ranks' statistics are pooled, so every rank returns the analysis
    one process would give on all of ``texts``; an error on any rank stops every rank.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    env = env or DistEnv()
    share = rank_share(texts, env)

    def analyse_share() -> Analyzer:
        encoded, cut = tokenize_texts(tokenizer, share, seq_len) if share else ([], 0)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # any id: padding is masked
        device = next(model.parameters()).device
        done = 0
        # entered even with an empty share: every rank then holds the same parts to pool
        with Analyzer(model, name=name, layers=layers, heads=heads, sample_rows=sample_rows) as a:
            for start in range(0, len(order), batch_size):
                chunk = [encoded[i] for i in order[start : start + batch_size]]
                a.run(pad_batch(chunk, pad_id, device))
                done += len(chunk)
                if progress is not None:
                    progress(done, len(order))
        a.truncated, a.seq_len = cut, seq_len
        return a

    a = agree(env, analyse_share)
    if env.distributed:
        a.all_reduce()
    return a.result()
