"""The batch: the one module that mutates a batch's state.

A ``Batch`` is created by the batcher from coalesced ``Work``; its partial
pools arrive from three places — the cache (hits pooled on the ranker), the
local pooler (monolithic layout) and the embedding servers' responses (on the
completion thread) — and all of them go through the methods here, under the
batch's own lock, so the finisher sees a batch exactly when its last part is
in.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from flexemr.model.spec import ModelSpec
from flexemr.routing.combine import Accumulator
from flexemr.wire import codec

from flexemrd.inference.admission import Work


@dataclasses.dataclass(slots=True)
class Part:
    """One subrequest of a batch: which connection carries it and what it asked for."""

    conn: int
    tables: list[int]
    counts: list[np.ndarray]   # ids per bag sent for each table (mean/max need them)


class Batch:
    """Coalesced requests on their way through the servers to the finisher."""

    def __init__(self, seq: int, works: list[Work], spec: ModelSpec, tables: list[int],
                 lengths: list[np.ndarray]) -> None:
        self.seq = seq
        self.works = works
        self.size = sum(w.batch for w in works)
        self.tables = tables
        self.acc = {t: Accumulator(spec.tables[t].pooling, self.size, spec.tables[t].dim, ln)
                    for t, ln in zip(tables, lengths)}
        self.parts: dict[int, Part] = {}
        self.error: str | None = None
        self.started = time.perf_counter()
        self.submitted = self.started
        self.parts_done = self.started
        self._remaining = 0
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- batcher

    def add_cached(self, table: int, pooled: np.ndarray, counts: np.ndarray) -> None:
        """Hits the ranker's cache pooled: one more partial, like a server's."""
        with self._lock:
            self.acc[table].add(pooled, counts)

    def set_pooled(self, table: int, pooled: np.ndarray) -> None:
        """The whole bag was pooled in one place (monolithic layout)."""
        with self._lock:
            self.acc[table].set_pooled(pooled)

    def expect(self, rid: int, part: Part) -> None:
        """Register a subrequest before it is submitted (its answer may come at once)."""
        with self._lock:
            self.parts[rid] = part
            self._remaining += 1

    def mark_submitted(self) -> None:
        self.submitted = time.perf_counter()

    # ---------------------------------------------------------------- completion thread (and failures)

    def complete(self, rid: int, payload: memoryview) -> bool:
        """A server's LOOKUP_RESP for ``rid``; True when that was the last part."""
        with self._lock:
            part = self.parts[rid]
            if self.error is None:
                _tids, partials = codec.decode_lookup_response(payload)
                for t, p, cnt in zip(part.tables, partials, part.counts):
                    self.acc[t].add(p, cnt)
            return self._part_done()

    def fail(self, rid: int | None, error: str) -> bool:
        """Part ``rid`` failed (None: the batch failed before any part); True when nothing is left."""
        with self._lock:
            self.error = self.error or error
            if rid is None:
                return self._remaining == 0
            return self._part_done()

    def _part_done(self) -> bool:
        self._remaining -= 1
        if self._remaining == 0:
            self.parts_done = time.perf_counter()
            return True
        return False

    # ---------------------------------------------------------------- finisher

    def pooled(self) -> dict[int, np.ndarray]:
        """Final pooled vectors per table (call once every part is in)."""
        return {t: self.acc[t].result() for t in self.tables}


def merge(works: list[Work], tables: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Concatenate the requests' ids per table; a request without a table gets empty bags."""
    values, lengths = [], []
    for t in tables:
        if len(works) == 1:
            v, ln = works[0].tables[t]
            values.append(v)
            lengths.append(ln)
            continue
        vs, ls = [], []
        for w in works:
            pair = w.tables.get(t)
            if pair is None:
                ls.append(np.zeros(w.batch, dtype=np.int32))
            else:
                vs.append(pair[0])
                ls.append(pair[1])
        values.append(np.concatenate(vs) if vs else np.zeros(0, dtype=np.int64))
        lengths.append(np.concatenate(ls))
    return values, lengths
