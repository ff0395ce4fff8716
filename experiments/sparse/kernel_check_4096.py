"""The portable kernel against dense attention restricted to the same blocks at 4096 tokens (the tests stop at
1024): random q/k/v with block-structured keys (so moba's scores differ between blocks), reference-long's
head shapes, each pattern's own selection; prints the largest absolute difference of the outputs.

    python experiments/sparse/kernel_check_4096.py
"""

import torch

from attnkit.sparse import SparseConfig, block_sparse_attention, choose_blocks, dense_reference


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, H, Hk, T, D, bs = 1, 4, 2, 4096, 32, 64  # reference-long: 4 query / 2 KV heads of 32
    q = torch.randn(B, H, T, D)
    k = torch.randn(B, Hk, T, D) + torch.randn(B, Hk, T // bs, 1, D).repeat_interleave(bs, 2).view(B, Hk, T, D)
    v = torch.randn(B, Hk, T, D)
    for pattern in ("window", "moba", "quest"):
        for density in (0.25, 0.75):
            sel = choose_blocks(q, k, SparseConfig(pattern=pattern, density=density, block_size=bs), causal=True)
            out = block_sparse_attention(q, k, v, sel.indices, sel.valid, sel.geometry, scale=D ** -0.5)
            ref = dense_reference(q, k, v, sel.block_mask(), sel.geometry, scale=D ** -0.5)  # (B, H, T, D), T x T inside
            print(f"{pattern}@{density:g}: {sel.slots} slots, max |sparse - restricted dense| = "
                  f"{float((out - ref).abs().max()):.2e}")


if __name__ == "__main__":
    main()
