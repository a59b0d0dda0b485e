"""DATA PATH: global pooling, the ranker's half of hierarchical pooling (FlexEMR 3.1.2).

Each embedding server pools the ids it holds for a bag into one partial
vector; the ranker combines the partials of a bag:

    sum   partial sums add up
    mean  partial *sums* add up, then divide by the bag's total length
          (the ranker knows it: it split the bag)
    max   elementwise max over the partials of servers that pooled at least
          one id of the bag (an empty partial is zeros, not -inf, on the wire)

:class:`Accumulator` does it incrementally, one partial at a time as the
responses arrive (serving); :func:`combine_partials` is the same code fed a
list (tests, the benchmarks' reference paths), so both are checked by the same
tests.  Whole-array numpy, no loop over bags.

A *compact* partial (protocol 3) has rows only for the bags that were sent to
its server (``rows``: their positions in the batch, unique and ascending);
it is scattered back with one fancy-indexed add or max.  Every bag sent has
at least one id, so max needs no emptiness mask for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flexemr.types import Pooling

__all__ = ["Accumulator", "SplitAccumulator", "combine_compact", "combine_partials"]


class Accumulator:
    """Global pooling of one table, fed partial pools as they arrive.

    The first partial is copied in (no zero fill first); later ones are added
    (sum, mean) or max-ed where that server pooled at least one id of the bag.
    ``lengths`` are the bags' total id counts (the divisor of mean pooling).
    """

    __slots__ = ("pooling", "out", "lengths", "empty")

    def __init__(self, pooling: Pooling, batch: int, dim: int, lengths: np.ndarray,
                 out: np.ndarray | None = None) -> None:
        self.pooling = pooling
        self.lengths = lengths
        self.out = np.empty((batch, dim), dtype=np.float32) if out is None else out
        self.empty = True

    def add(self, partial: np.ndarray, counts: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Fold in one server's partial pools [B, dim] and its per-bag id counts [B].

        With ``rows`` the partial is compact: [len(rows), dim], one row per
        bag ``rows`` names (each of which had ids there).
        """
        if rows is not None:
            self._scatter(partial, rows)
            return
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

    def _scatter(self, partial: np.ndarray, rows: np.ndarray) -> None:
        if len(rows) != len(partial):
            raise ValueError(f"a compact partial has {len(partial)} rows for {len(rows)} bags sent")
        if self.empty:
            # Bags this server was not sent start from the identity of the pooling.
            self.out.fill(-np.inf if self.pooling is Pooling.MAX else 0.0)
            self.out[rows] = partial
        elif self.pooling is Pooling.MAX:
            self.out[rows] = np.maximum(self.out[rows], partial)
        else:
            self.out[rows] += partial       # rows are unique: a buffered fancy add is exact
        self.empty = False

    def set_pooled(self, pooled: np.ndarray) -> None:
        """The whole bag was pooled in one place (in-ranker tables): take it as final."""
        self.out = pooled
        self.empty = False
        self.pooling = Pooling.SUM  # nothing left to divide or clean up

    def result(self) -> np.ndarray:
        """The pooled vectors [B, dim]; a bag no server had ids of is zeros.  Call once."""
        if self.empty:
            self.out.fill(0.0)
        elif self.pooling is Pooling.MAX:
            self.out[np.isneginf(self.out)] = 0.0
        elif self.pooling is Pooling.MEAN:
            self.out /= np.maximum(self.lengths, 1).astype(np.float32)[:, None]
        return self.out


class SplitAccumulator:
    """An :class:`Accumulator` whose [B, dim] result lives in separate arrays, one per run of bags.

    ``segments`` are ``(start, out)`` in ascending ``start`` from 0, each
    ``out`` a writable [n, dim] float32 array for bags ``[start, start + n)``
    of the batch, together covering it.  The ranker accumulates a batch of
    several clients' requests straight into each client's reply slot this way
    (flexemrd.inference.batch), so the answer is written once, where the
    client reads it.  Every partial costs one :class:`Accumulator` call per
    segment: meant for a few segments, not one per bag.
    """

    __slots__ = ("parts", "_starts")

    def __init__(self, pooling: Pooling, lengths: np.ndarray, segments: Sequence[tuple[int, np.ndarray]]) -> None:
        starts = [s for s, _out in segments]
        stops = starts[1:] + [len(lengths)]
        if not starts or starts[0] != 0 or any(s + len(o) != e for (s, o), e in zip(segments, stops)):
            raise ValueError(f"segments starting at {starts} do not tile a batch of {len(lengths)} bags")
        self.parts = [Accumulator(pooling, len(o), o.shape[1], lengths[s : s + len(o)], out=o) for s, o in segments]
        self._starts = np.asarray(starts + [len(lengths)], dtype=np.int64)

    def add(self, partial: np.ndarray, counts: np.ndarray, rows: np.ndarray | None = None) -> None:
        """As :meth:`Accumulator.add`: full partials are sliced, compact ones split where their rows cross."""
        starts = self._starts
        if rows is None:
            for i, acc in enumerate(self.parts):
                a, b = starts[i], starts[i + 1]
                acc.add(partial[a:b], counts[a:b])
            return
        if len(rows) != len(partial):
            raise ValueError(f"a compact partial has {len(partial)} rows for {len(rows)} bags sent")
        cut = np.searchsorted(rows, starts)   # rows are ascending: segment i holds rows[cut[i]:cut[i+1]]
        for i, acc in enumerate(self.parts):
            a, b = cut[i], cut[i + 1]
            acc.add(partial[a:b], counts, rows[a:b] - starts[i])   # counts are not read for compact partials

    def result(self) -> list[np.ndarray]:
        """Each segment's pooled vectors, finished in place (see :meth:`Accumulator.result`).  Call once."""
        return [acc.result() for acc in self.parts]


def combine_partials(
    pooling: Pooling,
    partials: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Global pooling of one table: partial pools [B, d] with their per-bag id counts [B].

    Runs the serving :class:`Accumulator` over the list, so what tests check is
    what the inference process does.
    """
    if not partials or len(partials) != len(counts):
        raise ValueError(f"combine_partials needs one counts array per partial, got {len(partials)} partials "
                         f"and {len(counts)} counts")
    first = partials[0]
    total = np.sum(counts, axis=0) if len(counts) > 1 else counts[0]
    acc = Accumulator(pooling, first.shape[0], first.shape[1], total, out=out)
    for p, c in zip(partials, counts):
        acc.add(p, c)
    return acc.result()


def combine_compact(
    pooling: Pooling,
    batch: int,
    dim: int,
    lengths: np.ndarray,
    partials: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    rows: Sequence[np.ndarray | None],
) -> np.ndarray:
    """Global pooling of one table from compact partials: ``partials[i]`` answers the bags ``rows[i]``
    (None: all ``batch``) with id counts ``counts[i]``; ``lengths`` [batch] are the bags' total lengths."""
    if not (len(partials) == len(counts) == len(rows)):
        raise ValueError(f"combine_compact needs as many counts ({len(counts)}) and rows ({len(rows)}) "
                         f"as partials ({len(partials)})")
    acc = Accumulator(pooling, batch, dim, lengths)
    for p, c, r in zip(partials, counts, rows):
        acc.add(p, c, r)
    return acc.result()
