"""The seam: every attention call, whatever the model, observed, overridden or replaced here.

    from attnkit.seam import attach
    from attnkit.seam.observers import MapCapture, StatsCollector

    capture = MapCapture()
    with attach(model, observers=[capture]):
        model(input_ids)
    capture.maps[0]          # (B, H, Q, K) probabilities of layer 0
"""

from attnkit.seam.attach import ADAPTERS, NoAttentionError, attach, observe_forward
from attnkit.seam.call import AttentionCall, ObservedChunk
from attnkit.seam.observers import MapCapture, StatsCollector
from attnkit.seam.patterns import PATTERNS
from attnkit.seam.protocol import attention
from attnkit.seam.score_mods import SCORE_MODS
from attnkit.seam.session import AttentionSession, Observer

__all__ = [
    "ADAPTERS", "AttentionCall", "AttentionSession", "MapCapture", "NoAttentionError", "ObservedChunk",
    "Observer", "PATTERNS", "SCORE_MODS", "StatsCollector", "attach", "attention", "observe_forward",
]
