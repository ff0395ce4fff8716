"""Run the model once through the seam and keep what the sections look at.

The sections never touch the model's modules: this module asks the seam for the attention
probabilities of every layer and the mask each row was given (``MapCapture`` with
``keep_allowed``), and asks the model itself for its hidden states (``output_hidden_states=True``).
Everything n × n is kept here on purpose: validate works on a modest sample (a few sequences of
~128 tokens).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from attnkit.errors import UserError
from attnkit.metrics import rows as R
from attnkit.seam import AttentionSession, MapCapture, NoAttentionError, observe_forward


@dataclass
class LayerView:
    """One layer's attention with the per-row quantities most sections need."""

    layer: int
    probs: Tensor  # (B, H, Q, K) float32
    allowed: Tensor  # (B, H, Q, K) bool

    @cached_property
    def n_visible(self) -> Tensor:  # (B, H, Q)
        return self.allowed.sum(-1)

    @cached_property
    def entropy(self) -> Tensor:  # (B, H, Q) nats
        return R.entropy(self.probs.double()).float()

    @cached_property
    def normalized_entropy(self) -> Tensor:  # (B, H, Q), NaN where a row sees < 2 keys
        return R.normalized_entropy(self.entropy, self.n_visible)

    @cached_property
    def row_std(self) -> Tensor:  # (B, H, Q): the std of each row's weights
        return R.std_over_visible(self.probs, self.allowed, self.n_visible)

    @property
    def num_heads(self) -> int:
        return self.probs.shape[1]


@dataclass
class Captured:
    """What one forward through the seam gave: ids, token text, attention per layer, hidden states."""

    input_ids: Tensor  # (B, T)
    tokens: list[list[str]]  # decoded text of every token, per sequence
    layers: list[LayerView]
    hidden_states: list[Tensor]  # L+1 tensors (B, T, D): embeddings, then each block's output
    special_ids: set[int] = field(default_factory=set)  # the tokenizer's special tokens ([CLS], [SEP], <|endoftext|>)
    special_names: dict[int, str] = field(default_factory=dict)
    punctuation_ids: set[int] = field(default_factory=set)  # tokens that are punctuation or symbols only

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def head_labels(self) -> list[tuple[int, int]]:
        return [(lv.layer, h) for lv in self.layers for h in range(lv.num_heads)]


def build_blocks(tokenizer, documents: list[str], seq_len: int, count: int) -> Tensor:
    """(N, T) token ids: up to ``count`` consecutive blocks of ``seq_len`` tokens, special tokens included.

    Documents are joined as in attnkit's perplexity (``attnkit.common.data.encode_documents``); each
    block is wrapped in the tokenizer's own special tokens. A text shorter than one block
    gives a single shorter block.
    """
    from attnkit.common.data import encode_documents, split_blocks
    from attnkit.common.data.blocks import special_token_prefix_suffix

    prefix, suffix = special_token_prefix_suffix(tokenizer)
    inner = seq_len - len(prefix) - len(suffix)
    if inner < 2:
        raise UserError(f"--seq-len {seq_len} leaves no room for text beside the {len(prefix) + len(suffix)} special tokens")
    ids = encode_documents(tokenizer, documents)
    blocks = split_blocks(ids, inner)
    if not blocks:
        raise UserError("the text has fewer than 2 tokens; validation needs some text")
    first = blocks[0].numel()
    chosen = [b for b in blocks if b.numel() == first][:count]
    pre, suf = torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long)
    return torch.stack([torch.cat([pre, b, suf]) for b in chosen])


def _is_punctuation(text: str) -> bool:
    text = text.strip()
    return bool(text) and all(unicodedata.category(c)[0] in "PS" for c in text)


def token_classes(tokenizer, ids: Tensor) -> tuple[list[list[str]], set[int], dict[int, str], set[int]]:
    uniq = sorted(set(ids.flatten().tolist()))
    text = {i: tokenizer.decode([i]) for i in uniq}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    present_special = {i for i in uniq if i in special}
    names = {i: (tokenizer.convert_ids_to_tokens(i) or text[i]) for i in present_special}
    punct = {i for i in uniq if i not in special and _is_punctuation(text[i])}
    tokens = [[text[i] for i in row] for row in ids.tolist()]
    return tokens, present_special, names, punct


@torch.no_grad()
def capture(model: nn.Module, tokenizer, input_ids: Tensor) -> Captured:
    """One forward of ``model`` on ``input_ids`` with every layer's attention kept; the model is left as found."""
    observer = MapCapture(keep_allowed=True)
    session = AttentionSession(taps=[observer])
    device = next(model.parameters()).device
    out = observe_forward(model, session, input_ids=input_ids.to(device),
                          attention_mask=torch.ones_like(input_ids).to(device), output_hidden_states=True)
    if not observer.maps:
        raise NoAttentionError(f"{type(model).__name__} ran no attention call attnkit could see")
    hidden = getattr(out, "hidden_states", None)
    if hidden is None and isinstance(out, tuple):
        hidden = next((x for x in out if isinstance(x, tuple)), None)
    hidden_states = [h.detach().float().cpu() for h in hidden] if hidden is not None else []
    layers = [LayerView(site.layer, observer.maps[site], observer.allowed[site]) for site in sorted(observer.maps)]
    tokens, special, names, punct = token_classes(tokenizer, input_ids)
    return Captured(input_ids=input_ids.cpu(), tokens=tokens, layers=layers, hidden_states=hidden_states,
                    special_ids=special, special_names=names, punctuation_ids=punct)
