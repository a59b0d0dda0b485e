"""Subrequests in flight: request id -> the batch (or cache fill) waiting for it.

Written by the batcher (register), read by the completion thread (take); the
lock is held only for dict operations.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

import numpy as np

from flexemrd.inference.batch import Batch


@dataclasses.dataclass(slots=True)
class Fill:
    """A FETCH of raw rows for the cache."""

    conn: int
    table: int
    rows: np.ndarray
    version: int = 0    # the model version the rows are fetched from (the cache drops other versions')


class PendingTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lookups: dict[int, Batch] = {}
        self._fills: dict[int, Fill] = {}
        self._rids = itertools.count(1)

    def next_rid(self) -> int:
        return next(self._rids)

    def add_lookups(self, batch: Batch, rids: list[int]) -> None:
        with self._lock:
            for rid in rids:
                self._lookups[rid] = batch

    def add_fill(self, rid: int, fill: Fill) -> None:
        with self._lock:
            self._fills[rid] = fill

    def take_lookup(self, rid: int) -> Batch | None:
        with self._lock:
            return self._lookups.pop(rid, None)

    def take_fill(self, rid: int) -> Fill | None:
        with self._lock:
            return self._fills.pop(rid, None)

    def on_connection(self, conn: int) -> tuple[list[int], list[int]]:
        """(lookup rids, fill rids) in flight on ``conn``."""
        with self._lock:
            lookups = [rid for rid, b in self._lookups.items() if b.parts.get(rid) is not None
                       and b.parts[rid].conn == conn]
            fills = [rid for rid, f in self._fills.items() if f.conn == conn]
        return lookups, fills

    def lookups(self) -> list[tuple[int, Batch]]:
        with self._lock:
            return list(self._lookups.items())

    def batches(self) -> int:
        with self._lock:
            return len({id(b) for b in self._lookups.values()})

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._lookups)
