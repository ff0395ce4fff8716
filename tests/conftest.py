"""Shared tiny-model factories and reference helpers for the seam and metrics tests.

Every factory builds a fresh config (``_from_config`` mutates the config it is given) and uses
a large ``initializer_range`` so that attention is far from uniform: a test that compares
probabilities against a reference must be able to tell the difference.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from torch import nn

# Tiny models on 2 shared cores: one thread avoids OpenMP contention (~30x faster here).
torch.set_num_threads(1)

VOCAB = 64
INIT = 0.2


def _ids(*shape: int, seed: int = 0, low: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, shape, generator=g)


def gpt2(attn: str = "eager", *, layers: int = 2, heads: int = 4, width: int = 32, dtype=None, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=128, n_embd=width, n_layer=layers, n_head=heads,
        initializer_range=INIT, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    kwargs = {"attn_implementation": attn}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return GPT2LMHeadModel._from_config(cfg, **kwargs).eval()


def bert(attn: str = "eager", *, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=INIT, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel._from_config(cfg, attn_implementation=attn).eval()


def llama(attn: str = "eager", *, seed: int = 0):
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=INIT,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


MISTRAL_WINDOW = 4


def mistral(attn: str = "eager", *, seed: int = 0):
    """Sliding window of 4 keys (the query's own position and the 3 before it), GQA 4/2."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=INIT, sliding_window=MISTRAL_WINDOW,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return MistralForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def mha(embed: int = 16, heads: int = 4, *, seed: int = 0, batch_first: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(embed, heads, batch_first=batch_first).eval()
    with torch.no_grad():
        m.in_proj_weight.mul_(3.0)  # peaked attention
        m.in_proj_bias.normal_(0, 0.5)
    return m


def encoder(layers: int = 2, *, seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False).eval()
    with torch.no_grad():
        for lyr in enc.layers:
            lyr.self_attn.in_proj_weight.mul_(3.0)
    return enc


def causal_block(n: int) -> torch.Tensor:
    """nn.MultiheadAttention convention: True = blocked (future keys)."""
    return torch.triu(torch.ones(n, n, dtype=torch.bool), 1)


def reference_probs(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float | None = None):
    """softmax(q k^T * scale) over allowed keys, computed in float64, rows that see nothing all zero."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    p = torch.softmax(logits, -1)
    return torch.nan_to_num(p, nan=0.0).float()


@pytest.fixture
def ids():
    return _ids(2, 10)


@pytest.fixture(autouse=True)
def _fastpath_guard():
    """No test may leave the MultiheadAttention fast-path flag changed for the next one."""
    before = torch.backends.mha.get_fastpath_enabled()
    yield
    after = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(before)
    assert after == before, "torch.backends.mha fast-path flag leaked out of a test"


def cannot_create_in(directory: str) -> bool:
    """True when no new file can be made in ``directory`` (a read-only place, whoever we are)."""
    try:
        fd, name = tempfile.mkstemp(dir=directory)
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


# A corpus folder with a train and a test split (the test split reads differently from the train
# split), for the commands that take --corpus: attnkit sparse train and eval.
GENESIS = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
           "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(GENESIS * 40)
    (d / "test.txt").write_text(GENESIS[::-1] * 10 + GENESIS * 10)
    return str(d)
