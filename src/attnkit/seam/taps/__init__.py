"""Taps: what sees the attention of a call, detached, without gradients.

A tap names what it wants and the session hands it just that:

- ``observe(chunk)``: logits and probabilities of a chunk of query rows (``ObservedChunk``),
  computed in a separate pass under ``torch.no_grad`` from detached queries and keys, with every
  score/mask modifier applied: what the output was computed from;
- ``on_output(call, out)``: the call's output, detached (``wants_output``);
- ``on_grad_output(call, grad)``: the gradient of the loss with respect to that output, during
  backward (``wants_grad_output``);
- ``on_call(call)``: the live call before it runs (``wants_call``). Its tensors are in the
  autograd graph: a tap that keeps them keeps the graph (validate's gradient section does this
  on purpose, for one forward).

Gradient-checkpoint recomputes call attention again during backward: taps do not see those.

    from attnkit.seam.taps import MapCapture, StatsCollector
    stats = StatsCollector()
    with attach(model, taps=[stats]):
        model(ids)
    stats.heads()
"""

from attnkit.seam.taps.base import ObservedChunk, Tap
from attnkit.seam.taps.maps import MapCapture
from attnkit.seam.taps.stats import StatsCollector

__all__ = ["MapCapture", "ObservedChunk", "StatsCollector", "Tap"]
