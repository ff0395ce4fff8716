"""What a tap is (``Tap``) and what it is handed (``ObservedChunk``); ``attnkit.seam.taps`` says how taps are used."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from attnkit.seam.call import AttentionCall
from attnkit.seam.sites import Site


@dataclass
class ObservedChunk:
    """A chunk of query rows of one call, for the observed heads only.

    logits: (B, h, R, K') float32 pre-softmax, after every modifier, -inf where masked.
    allowed: bool, broadcastable to logits. K' may be a prefix of the call's keys (see
    ``Tap.accepts_key_prefix``). ``probs`` is computed on first use.
    """

    call: AttentionCall
    site: Site
    head_ids: list[int]
    rows: Tensor  # (R,) query row indices in the call
    sampled: bool  # rows are a random sample of the call's query rows
    logits: Tensor
    allowed: Tensor
    positions: Tensor  # (R,) each row's position among the keys
    row_valid: Tensor  # (B, R) False for padding queries
    query_norm: Tensor  # (B, h, R)
    key_norm_max: Tensor  # (B, h)
    qk_absmax: Tensor  # (B, h, R) largest |q.k| over visible keys, before scaling, in the model's dtype
    logit_max: Tensor | None = None  # (B, h, R) when the producer has them already
    logit_min: Tensor | None = None
    sinks: Tensor | None = None  # (B|1, h, R|1, 1) learned sink logits of the observed heads and rows
    _probs: Tensor | None = field(default=None, repr=False)

    @property
    def layer(self) -> int:
        return self.site.layer

    @property
    def probs(self) -> Tensor:
        """(B, h, R, K') float32 attention probabilities; rows that see nothing are zero."""
        if self._probs is None:
            from attnkit.seam.kernels.dense import softmax_rows

            self._probs = softmax_rows(self.logits, self.allowed, self.sinks)
        return self._probs


class Tap:
    """Base class: override what you need and set the matching ``wants_*`` flags.

    ``accepts_key_prefix``: True when the tap is content with chunks cut to a prefix of the keys
    that holds every key the chunk's rows can see and each row's own position (so
    ``logits.shape[-1]`` may be less than the call's key length). When every chunk tap says so
    and the call is causal, the observation skips the keys a row cannot see.
    """

    wants_chunks = True
    wants_output = False
    wants_grad_output = False
    wants_call = False
    accepts_key_prefix = False

    def start_forward(self) -> None:  # noqa: B027 - optional hook
        """Called before each forward of the model the session is attached to."""

    def on_call(self, call: AttentionCall) -> None:  # noqa: B027
        pass

    def observe(self, chunk: ObservedChunk) -> None:  # noqa: B027
        pass

    def on_output(self, call: AttentionCall, out: Tensor) -> None:  # noqa: B027
        pass

    def on_grad_output(self, call: AttentionCall, grad: Tensor) -> None:  # noqa: B027
        pass
