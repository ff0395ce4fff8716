"""The TransformerAE of the weight-merging collapse study: merge two small CNNs by reading their flattened weights as 50 tokens.

    two CNNs' weights (B, 2 x 1232) -> EmbedderNeuronGroup -> 50 tokens (B, 50, d_model)
        -> encoder (n_layer blocks, attention through attnkit's seam) -> decoder -> merged CNN (B, 1232)

Tokens (per input model: 192 numbers in 12 chunks of 16, 1040 in 13 chunks of 80):

    [ A's 12 x 16 | B's 12 x 16 | A's 13 x 80 | B's 13 x 80 ]   = 24 chunks of 16 + 26 chunks of 80

``neuron_l1`` = Linear(16, d_model) embeds the 24 short chunks, ``neuron_l2`` = Linear(80, d_model)
the 26 long ones; a learned position table tells the 50 apart. The decoder reads, for merged
chunk i, the encoder outputs of A's and B's chunk i side by side (2 d_model -> d_model -> 16 or 80).

The CNN (``ZooCNN``, exactly 1232 parameters, 8x8 digits, 10 classes):
    conv1 Conv2d(1, 12, 4, padding=1, no bias)  192   (B,1,8,8) -> (B,12,7,7) -> ReLU -> MaxPool 2 -> (B,12,3,3)
    conv2 Conv2d(12, 10, 1)                     130   -> (B,10,3,3) -> ReLU -> flatten (B,90)
    fc    Linear(90, 10)                        910   -> (B,10) logits
The first 192 numbers (conv1) are the short chunks, the remaining 1040 the long ones.

The attention modules follow attnkit's protocol (``is_attnkit_attention``, ``attnkit.seam.attention``),
so ``analyze``, ``validate``, ``monitor`` and gates (``attnkit.gate.add_gates``, layout ``attnkit``:
the gate reads the module's input and multiplies ``proj``'s input) work on it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.seam import attention

CNN_PARAMS = 1232
L1_CHUNK, L1_PER_MODEL = 16, 12  # 12 x 16 = 192 (conv1)
L2_CHUNK, L2_PER_MODEL = 80, 13  # 13 x 80 = 1040 (conv2 + fc)
L1_SIZE = L1_CHUNK * L1_PER_MODEL
N_TOKENS = 2 * (L1_PER_MODEL + L2_PER_MODEL)  # 50


class ZooCNN(nn.Module):
    """The zoo's CNN: 1232 parameters (see the module docstring for shapes)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 4, padding=1, bias=False)
        self.conv2 = nn.Conv2d(12, 10, 1)
        self.fc = nn.Linear(90, 10)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, 8, 8) -> (B, 10)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 12, 3, 3)
        x = F.relu(self.conv2(x))  # (B, 10, 3, 3)
        return self.fc(x.flatten(1))


def cnn_shapes() -> dict[str, torch.Size]:
    return {k: v.shape for k, v in ZooCNN().state_dict().items()}


def flatten_cnn(model: ZooCNN) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()])


def unflatten_cnn(flat: Tensor) -> dict[str, Tensor]:
    """(..., 1232) -> ZooCNN state dict (leading dims kept: a batch of CNNs for vmap)."""
    out, i = {}, 0
    for name, shape in cnn_shapes().items():
        n = math.prod(shape)
        out[name] = flat[..., i:i + n].reshape(*flat.shape[:-1], *shape)
        i += n
    assert i == CNN_PARAMS
    return out


@dataclass
class AEConfig:
    d_model: int = 128  # seed: 100 - 960
    n_head: int = 4
    n_layer: int = 2
    d_ff: int = 256
    dropout: float = 0.0
    norm_first: bool = False  # False: post-norm, as nn.TransformerEncoderLayer's default (the collapse study's encoder)
    embed_norm: bool = False  # LayerNorm the token embeddings before the first block


class EmbedderNeuronGroup(nn.Module):
    """(B, 2464) -> (B, 50, d_model): 24 chunks of 16 through ``neuron_l1``, 26 of 80 through ``neuron_l2``."""

    def __init__(self, d_model: int):
        super().__init__()
        self.neuron_l1 = nn.Linear(L1_CHUNK, d_model)
        self.neuron_l2 = nn.Linear(L2_CHUNK, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        a, b = x[:, :CNN_PARAMS], x[:, CNN_PARAMS:]  # (B, 1232) each
        short = torch.cat([a[:, :L1_SIZE], b[:, :L1_SIZE]], 1).view(B, 2 * L1_PER_MODEL, L1_CHUNK)  # (B, 24, 16)
        long = torch.cat([a[:, L1_SIZE:], b[:, L1_SIZE:]], 1).view(B, 2 * L2_PER_MODEL, L2_CHUNK)  # (B, 26, 80)
        return torch.cat([self.neuron_l1(short), self.neuron_l2(long)], 1)  # (B, 50, d_model)


class SelfAttention(nn.Module):
    is_attnkit_attention = True  # attnkit's protocol: the seam sees every call

    def __init__(self, cfg: AEConfig, layer_idx: int):
        super().__init__()
        # rows [q | k | v]: attnkit's "fused" query/key layout (seam/layouts.py) reads them by these names
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.d_model, self.n_head, self.layer_idx, self.dropout = cfg.d_model, cfg.n_head, layer_idx, cfg.dropout
        self.head_dim, self.num_key_value_heads = cfg.d_model // cfg.n_head, cfg.n_head

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = attention(self, q, k, v, dropout_p=self.dropout)  # (B, nh, T, hs), no mask: every token sees all 50
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # a gate multiplies proj's input (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: AEConfig, layer_idx: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, layer_idx)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self.drop(self.attn(self.ln_1(x)))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x)))
        return self.ln_2(x + self.drop(self.mlp(x)))


class TransformerAE(nn.Module):
    """(B, 2 x 1232) flattened weights of two ZooCNNs -> (B, 1232) merged weights."""

    def __init__(self, cfg: AEConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or AEConfig()
        if overrides:
            cfg = AEConfig(**{**asdict(cfg), **overrides})
        self.config = cfg
        self.embed = EmbedderNeuronGroup(cfg.d_model)
        self.pos = nn.Parameter(torch.randn(N_TOKENS, cfg.d_model) * 0.02)
        self.ln_e = nn.LayerNorm(cfg.d_model) if cfg.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.dec_l1 = nn.Sequential(nn.Linear(2 * cfg.d_model, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, L1_CHUNK))
        self.dec_l2 = nn.Sequential(nn.Linear(2 * cfg.d_model, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, L2_CHUNK))

    def encode(self, x: Tensor) -> Tensor:  # (B, 2464) -> (B, 50, d_model)
        h = self.ln_e(self.embed(x) + self.pos)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def forward(self, x: Tensor) -> Tensor:  # (B, 2464) -> (B, 1232)
        h = self.encode(x)
        B, n1, n2 = x.shape[0], L1_PER_MODEL, L2_PER_MODEL
        short = torch.cat([h[:, :n1], h[:, n1:2 * n1]], -1)  # (B, 12, 2 d): A's and B's chunk i side by side
        long = torch.cat([h[:, 2 * n1:2 * n1 + n2], h[:, 2 * n1 + n2:]], -1)  # (B, 13, 2 d)
        return torch.cat([self.dec_l1(short).reshape(B, -1), self.dec_l2(long).reshape(B, -1)], 1)  # (B, 1232)


def build(config: dict | None = None) -> TransformerAE:
    """Factory for ``attnkit ... module:factory --config`` and for checkpoints' ``ae_config.json``."""
    return TransformerAE(AEConfig(**dict(config or {})))


class AEProbe(nn.Module):
    """A TransformerAE with fixed input pairs, for the command line: token id i runs pair i.

        attnkit analyze attnkit.models.transformer_ae:probe --checkpoint DIR/analyzable.safetensors \\
            --config DIR/ae_config.json --tokenizer ids --text "0 1 2 3"

    input_ids (B, T) -> the AE on pairs[ids] (B*T, 2464) -> (B*T, 1232). The pairs travel in the
    checkpoint (``pairs``), beside the AE's weights (``ae.*``)."""

    def __init__(self, ae: TransformerAE, num_pairs: int):
        super().__init__()
        self.ae = ae
        self.register_buffer("pairs", torch.zeros(num_pairs, 2 * CNN_PARAMS))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.ae(self.pairs[input_ids.reshape(-1) % self.pairs.shape[0]])


def probe(config: dict | None = None) -> AEProbe:
    """Factory for ``attnkit analyze``: ``config`` is an ``AEConfig`` as a dict plus ``num_pairs``."""
    config = dict(config or {})
    n = int(config.pop("num_pairs", 64))
    return AEProbe(TransformerAE(AEConfig(**config)), n)
