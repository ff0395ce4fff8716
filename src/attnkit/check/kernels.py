"""Which attention figure a kernel stores in the compute format before the softmax, per attention
implementation (transformers' ``config._attn_implementation``).

Eager attention (transformers' reference code for GPT-2, Llama and most families) computes the raw
product first and scales it after, both in the autocast dtype::

    attn_weights = torch.matmul(query, key.transpose(-1, -2))   # raw q·kᵀ, stored in fp16 under fp16 autocast
    attn_weights = attn_weights * scaling                         # (GPT-2: / sqrt(d)), the logits

so the raw |q·k| (and, when the scale is above 1, the logits) must stay below the format's largest
value: at scale 1/8 the logits may reach only 65,504 / 8 = 8,188 in fp16. PyTorch's SDPA math
backend multiplies q and k by √scale each before the product, and the fused kernels (SDPA's flash
and memory-efficient ones, FlashAttention, flex attention) scale inside the kernel with fp32
accumulators: the largest value held is at most the logit itself.

A kernel not named here (or a config that names none) is judged as eager, the larger of the two.
"""

from __future__ import annotations

from collections.abc import Callable

# kernel -> (largest |raw q·kᵀ|, largest |logit|) -> the largest value the kernel stores in the format
KERNEL_PRODUCTS: dict[str, Callable[[float, float], float]] = {
    "eager": lambda raw, logit: max(raw, logit),
    "sdpa": lambda raw, logit: logit,
    "flash_attention_2": lambda raw, logit: logit,
    "flash_attention_3": lambda raw, logit: logit,
    "flex_attention": lambda raw, logit: logit,
}
DEFAULT_KERNEL = "eager"


def stored_product(kernel: str | None, raw: float, logit: float) -> float:
    """The largest value ``kernel`` stores in the compute format before the softmax."""
    return KERNEL_PRODUCTS.get(kernel or DEFAULT_KERNEL, KERNEL_PRODUCTS[DEFAULT_KERNEL])(raw, logit)


def kernel_words(kernel: str | None) -> str:
    """How the kernel computes the product, for a finding's message."""
    name = kernel if kernel in KERNEL_PRODUCTS else None
    if (name or DEFAULT_KERNEL) == "eager":
        return ("eager attention stores q.k before the scale" if name else
                "judged as eager attention (q.k stored before the scale): the config names no kernel")
    return f"{name} scales q before the product"
