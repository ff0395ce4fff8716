"""Attention kernels: what computes a call's output once the session has decided what to do.

Each kernel is a registry entry with ``supports(call, mods)`` and ``run(call, mods, chunk)``;
``choose`` takes the first that supports the call, in this order:

- ``native``: the model's own kernel (SDPA, flash, eager) exactly as the model would have run
  it; a temperature folds into its softmax scale.
- ``sdpa``: ``F.scaled_dot_product_attention`` on the call (adapters without a native kernel).
- ``flex``: FlexAttention with the mods as ``score_mod`` / ``mask_mod`` (on CUDA; on CPU only
  when asked for and without gradients: PyTorch has no CPU backward for it).
- ``dense``: attnkit's own, any mods, any device, with a backward: query rows in chunks, each
  chunk checkpointed, so training memory stays near SDPA's instead of growing with T².

Kernels that evaluate modifiers themselves do it through ``modifiers`` (FlexAttention's
per-element semantics; a row left with no visible key is zero, not NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from attnkit.seam.kernels import dense, flex, sdpa

if TYPE_CHECKING:
    from attnkit.seam.call import AttentionCall
    from attnkit.seam.plan import Mods


@dataclass(frozen=True)
class Kernel:
    name: str
    supports: Callable[[AttentionCall, Mods, bool], bool]  # (call, mods, chosen explicitly)
    run: Callable[[AttentionCall, Mods, int], Tensor]  # (call, mods, chunk elements) -> (B, H, Q, Dv)


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel("native", sdpa.native_supports, sdpa.native_attention),
        Kernel("sdpa", sdpa.sdpa_supports, sdpa.sdpa_attention),
        Kernel("flex", flex.flex_supports, flex.flex_attention_call),
        Kernel("dense", dense.dense_supports, dense.dense_attention),
    )
}


def choose(call: AttentionCall, mods: Mods, name: str = "auto") -> Kernel:
    """The kernel that runs ``call`` with ``mods``: ``name``'s, or the first that supports it."""
    if name != "auto":
        kernel = KERNELS.get(name)
        if kernel is None:
            raise ValueError(f"no attention kernel {name!r}; kernels: {', '.join(KERNELS)}")
        if not kernel.supports(call, mods, True):
            able = [k.name for k in KERNELS.values() if k.name != name and k.supports(call, mods, True)]
            instead = f"kernels that can: {', '.join(able)} (or kernel='auto')" if able else "use kernel='auto'"
            raise ValueError(f"the {name} kernel cannot run this call ({call.site}"
                             f"{', with score/mask modifiers' if mods else ''}); {instead}")
        return kernel
    for kernel in KERNELS.values():
        if kernel.supports(call, mods, False):
            return kernel
    raise AssertionError("the dense kernel supports every call")


__all__ = ["KERNELS", "Kernel", "choose"]
