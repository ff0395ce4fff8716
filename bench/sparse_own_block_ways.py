"""Ways to run the two parts of ``split_sdpa`` on the CPU, against what it does, on one layer's shapes
of ``reference-long`` (4 query / 2 KV heads of 32, fp32, one thread), CPU time, interleaved rounds.

The own blocks (every query block against its own key block, causal):
  strided    what ``split_sdpa`` does: one causal SDPA call over every query block, q/k/v read
             in place (strided views of the model's (B, tokens, heads, D) layout)
  folded     the KV group's heads folded into 2·bs query rows, an additive causal mask
  matmul     two matrix products and a log-sum-exp
  copied     ``strided`` on contiguous copies (the copies timed too)

The whole attention at density 0.25 (``moba``'s selection on random q/k):
  sdpa       dense causal SDPA
  split_sdpa the library's CPU kernel
  flex       ``torch.compile(flex_attention)`` with a ``BlockMask`` of the same kept blocks (the diagonal
             blocks partial, the others full); compiled once before the rounds

    python bench/sparse_own_block_ways.py --length 8192 --block-size 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import interleave  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention row")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from attnkit.seam.kernels.split_sdpa import split_sdpa_attention
    from attnkit.sparse import SparseConfig
    from attnkit.sparse.attention import choose_blocks

    torch.set_num_threads(1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    T, H, Hk, D, bs = args.length, 4, 2, 32, args.block_size
    G, nQ, scale = H // Hk, T // bs, D ** -0.5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, h, D, generator=g).transpose(1, 2) for h in (H, Hk, Hk))  # (B, heads, T, D) views
    qb = q.reshape(H, nQ, bs, D).transpose(0, 1)  # (nQb, H, bs, D), strided
    kb, vb = (t.reshape(Hk, nQ, bs, D).transpose(0, 1) for t in (k, v))
    causal = torch.full((bs, bs), float("-inf")).triu(1).repeat(G, 1)[None, None]  # (1, 1, G·bs, bs)

    def strided():
        return flash(qb, kb, vb, 0.0, True, scale=scale)[0]

    def folded():
        return flash(qb.reshape(nQ, Hk, G * bs, D), kb, vb, 0.0, False, attn_mask=causal, scale=scale)[0]

    def matmul():
        s = torch.matmul(qb.reshape(nQ, Hk, G * bs, D), kb.transpose(-1, -2)).mul_(scale).add_(causal)
        return torch.matmul(s.sub_(torch.logsumexp(s, -1, keepdim=True)).exp_(), vb)

    def copied():
        return flash(qb.contiguous(), kb.contiguous(), vb.contiguous(), 0.0, True, scale=scale)[0]

    reference = strided().reshape(nQ, Hk, G * bs, D)
    for fn in (folded, matmul):
        assert torch.allclose(fn(), reference, atol=1e-5), fn.__name__

    sel = choose_blocks(q, k, SparseConfig(pattern="moba", density=0.25, block_size=bs))
    whole = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "split_sdpa": lambda: split_sdpa_attention(q, k, v, sel.indices, sel.valid, sel.geometry, scale=scale),
    }
    if not args.no_flex:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        mask = sel.block_mask()[0].repeat_interleave(G, 0)  # (H, nQb, nKb) bool
        diagonal = torch.eye(nQ, dtype=torch.bool)
        partial, full = mask & diagonal, mask & ~diagonal

        def as_kv_blocks(m):  # counts (1, H, nQb) and the kept blocks first (1, H, nQb, nKb)
            order = m.int().argsort(dim=-1, descending=True, stable=True)
            return m.sum(-1).int()[None], order.int()[None]

        block_mask = BlockMask.from_kv_blocks(*as_kv_blocks(partial), *as_kv_blocks(full), BLOCK_SIZE=bs,
                                              mask_mod=lambda b, h, qi, ki: ki <= qi, seq_lengths=(T, T))
        compiled = torch.compile(flex_attention, dynamic=False)
        whole["flex"] = lambda: compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
        with torch.no_grad():
            assert torch.allclose(whole["flex"](), whole["split_sdpa"](), atol=1e-5)

    with torch.no_grad():
        for title, fns, base in (("own blocks", {"strided": strided, "folded": folded, "matmul": matmul,
                                                   "copied": copied}, "strided"),
                                 (f"whole attention, moba@0.25 (kept {sel.kept_blocks() / sel.candidate_blocks():.3f})",
                                  whole, "sdpa")):
            r = {n: t["cpu"] for n, t in interleave(fns, args.rounds).items()}
            print(f"{title}, {T} tokens, blocks of {bs}, {args.rounds} rounds (CPU time):")
            for n, ts in r.items():
                ratio = statistics.median(a / b for a, b in zip(ts, r[base]))
                print(f"  {n:>10}: {statistics.median(ts) * 1e3:8.2f} ms  {ratio:5.2f}x {base}")


if __name__ == "__main__":
    main()
