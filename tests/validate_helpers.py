"""Tiny models and a tokenizer for the validate tests (no hub: the reference tokenizer ships with attnkit)."""

from __future__ import annotations

from pathlib import Path

import torch

import attnkit.models

REFERENCE_DIR = Path(attnkit.models.__file__).parent / "reference"
TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
    "and God divided the light from the darkness. And God called the light Day, and the darkness he called "
    "Night. And the evening and the morning were the first day. And God said, Let there be a firmament in "
    "the midst of the waters, and let it divide the waters from the waters."
)


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REFERENCE_DIR)


def tiny_gpt2(tok, *, zero_qk: bool = False, layers: int = 2, heads: int = 4, width: int = 32, seed: int = 0):
    """A random GPT-2 on eager attention; ``zero_qk`` zeroes the query/key projections so every
    attention row is exactly uniform, without attnkit's seam."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=width, n_layer=layers, n_head=heads,
                     initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    if zero_qk:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[:, : 2 * width] = 0.0
                block.attn.c_attn.bias[: 2 * width] = 0.0
    return model


def save_tiny(path: Path, *, zero_qk: bool = False, extra_tokens: list[str] | None = None) -> Path:
    tok = tokenizer()
    if extra_tokens:
        tok.add_tokens(extra_tokens)
    model = tiny_gpt2(tok, zero_qk=zero_qk)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
