"""The nine sections, in report order. Each is a plain function ``Context -> Section``."""

from __future__ import annotations

from collections.abc import Callable

from attnkit.validate.ablation import ablation
from attnkit.validate.context import Context
from attnkit.validate.diversity import diversity
from attnkit.validate.gradients import gradients
from attnkit.validate.heads import heads
from attnkit.validate.positional import positional
from attnkit.validate.query_variation import query_variation
from attnkit.validate.sanity import sanity
from attnkit.validate.statistics import statistics
from attnkit.validate.tokens import tokens
from attnkit.validate.types import Section

SECTIONS: list[tuple[str, Callable[[Context], Section]]] = [
    ("sanity", sanity),
    ("positional", positional),
    ("tokens", tokens),
    ("statistics", statistics),
    ("heads", heads),
    ("query_variation", query_variation),
    ("diversity", diversity),
    ("gradients", gradients),
    ("ablation", ablation),
]
