"""The seam: every attention call, whatever the model, observed, modified or replaced here.

    from attnkit.seam import attach
    from attnkit.seam.taps import MapCapture, StatsCollector
    from attnkit.seam.mods import PATTERNS, soft_cap

    capture = MapCapture()
    with attach(model, taps=[capture]):
        model(input_ids)
    capture.maps[Site(0)]    # (B, H, Q, K) probabilities of layer 0

    with attach(model, **PATTERNS["uniform"], layers=[3], heads=[5]):
        model(input_ids)     # head 5 of layer 3 attends uniformly

A call goes plan → kernel → taps (``session.py``); adapters (``adapters/``) reach the calls of
Hugging Face models, ``nn.MultiheadAttention`` and hand-written modules (``attention``).
"""

from attnkit.seam.adapters import ADAPTERS
from attnkit.seam.adapters.protocol import attention
from attnkit.seam.attach import NoAttentionError, attach, eval_mode, forward_no_grad, observe_forward, unwrap
from attnkit.seam.call import AttentionCall, build_call
from attnkit.seam.plan import Mods, Plan
from attnkit.seam.session import AttentionSession, run_call
from attnkit.seam.sites import Site
from attnkit.seam.taps import MapCapture, ObservedChunk, StatsCollector, Tap

__all__ = [
    "ADAPTERS", "AttentionCall", "AttentionSession", "MapCapture", "Mods", "NoAttentionError", "ObservedChunk",
    "Plan", "Site", "StatsCollector", "Tap", "attach", "attention", "build_call", "eval_mode", "forward_no_grad", "observe_forward", "run_call",
    "unwrap",
]
