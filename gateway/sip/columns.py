"""Per-call state as NumPy columns that grow with the number of calls.

The leg bank keeps every call as a row; its helpers (receive statistics, jitter
buffers) each hold a dozen such columns. One table per class names each column's
shape, type and starting value, so growing the bank and handing a row to a new
call read the same list and cannot drift apart.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

Column = tuple[str, tuple[int, ...], Any, float]  # name, shape after the row, dtype, fill


class Columns:
    """Base class: ``COLUMNS`` become attributes of shape (capacity, *shape)."""

    COLUMNS: ClassVar[tuple[Column, ...]] = ()
    capacity = 0

    def grow(self, capacity: int) -> None:
        """Make room for ``capacity`` rows, keeping the rows already in use."""
        if capacity <= self.capacity:
            return
        n = self.capacity
        for name, shape, dtype, fill in self.COLUMNS:
            new = np.full((capacity, *shape), fill, dtype)
            old = self.__dict__.get(name)
            if old is not None:
                new[:n] = old
            setattr(self, name, new)
        self.capacity = capacity

    def reset(self, row: int) -> None:
        """A new call takes this row: every column back to its starting value."""
        for name, _, _, fill in self.COLUMNS:
            getattr(self, name)[row] = fill
