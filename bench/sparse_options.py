"""The sparse options the benchmarks share: the model, the pattern(s), the density(ies) and the block size.

    p = argparse.ArgumentParser()
    add_sparse_options(p, pattern="moba", several=("density",))   # --model --pattern --densities --block-size
"""

from __future__ import annotations

import argparse
from collections.abc import Collection


def add_sparse_options(parser: argparse.ArgumentParser, *, pattern: str = "quest", density: float | str = 0.25,
                       block_size: int = 64, several: Collection[str] = (), density_help: str | None = None) -> None:
    """Add ``--model``, ``--pattern``, ``--density`` and ``--block-size`` to ``parser``; an option
    named in ``several`` ("pattern", "density") takes a comma-separated list instead, under its
    plural name (``--patterns``, ``--densities``, given as a string)."""
    parser.add_argument("--model", default="reference-long")
    if "pattern" in several:
        parser.add_argument("--patterns", default=pattern)
    else:
        parser.add_argument("--pattern", default=pattern)
    if "density" in several:
        parser.add_argument("--densities", default=str(density), help=density_help)
    else:
        parser.add_argument("--density", type=float, default=density, help=density_help)
    parser.add_argument("--block-size", type=int, default=block_size)
