"""Bounded history: fixed-size ring buffers, so a monitor's memory is flat however long it runs."""

from __future__ import annotations

import numpy as np


class Ring:
    """The last ``capacity`` rows of ``width`` float64 values, each with its step.

    ``append`` overwrites the oldest row once full; ``last(n)`` returns (steps, values) in order,
    oldest first. Memory is allocated once: ``capacity * (width + 1) * 8`` bytes.
    """

    def __init__(self, capacity: int, width: int) -> None:
        if capacity < 2:
            raise ValueError("a ring needs at least 2 rows")
        self.capacity, self.width = capacity, width
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.values = np.full((capacity, width), np.nan)
        self.count = 0  # rows ever appended

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def append(self, step: int, row) -> None:
        i = self.count % self.capacity
        self.steps[i] = step
        self.values[i] = row
        self.count += 1

    def last(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        k = len(self) if n is None else min(n, len(self))
        idx = (np.arange(self.count - k, self.count) % self.capacity) if k else np.zeros(0, dtype=np.int64)
        return self.steps[idx], self.values[idx]

    def rewound(self, until: int, shift: int) -> "Ring":
        """A new ring with the rows up to step ``until``, their steps moved by ``shift`` (a rollback to
        the state after step ``until``, continued at step ``until + shift + 1``)."""
        steps, values = self.last()
        ring = Ring(self.capacity, self.width)
        for s, row in zip(steps, values):
            if s <= until:
                ring.append(int(s) + shift, row)
        return ring

    @property
    def nbytes(self) -> int:
        return self.steps.nbytes + self.values.nbytes
