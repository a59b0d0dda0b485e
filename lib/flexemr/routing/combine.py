"""Global pooling: combining per-server partial pools into the final pooled vectors."""

from __future__ import annotations

import numpy as np

from flexemr.types import Pooling


class Accumulator:
    """Global pooling of one table, fed partial pools as they arrive (FlexEMR 3.1.2).

    The first partial is copied in (no zero fill first); later ones are added
    (sum, mean) or max-ed where that server pooled at least one id of the bag.
    """

    __slots__ = ("pooling", "out", "lengths", "empty")

    def __init__(self, pooling: Pooling, batch: int, dim: int, lengths: np.ndarray) -> None:
        self.pooling = pooling
        self.lengths = lengths
        self.out = np.empty((batch, dim), dtype=np.float32)
        self.empty = True

    def add(self, partial: np.ndarray, counts: np.ndarray) -> None:
        if self.pooling is Pooling.MAX:
            has = (counts > 0)[:, None]
            if self.empty:
                np.copyto(self.out, np.float32(-np.inf))
            np.maximum(self.out, partial, out=self.out, where=has)
        elif self.empty:
            np.copyto(self.out, partial)
        else:
            self.out += partial
        self.empty = False

    def set_pooled(self, pooled: np.ndarray) -> None:
        """The whole bag was pooled in one place (in-ranker tables): take it as final."""
        self.out = pooled
        self.empty = False
        self.pooling = Pooling.SUM  # nothing left to divide or clean up

    def result(self) -> np.ndarray:
        if self.empty:
            self.out.fill(0.0)
        elif self.pooling is Pooling.MAX:
            self.out[np.isneginf(self.out)] = 0.0
        elif self.pooling is Pooling.MEAN:
            self.out /= np.maximum(self.lengths, 1).astype(np.float32)[:, None]
        return self.out
