"""Offline exact LRU simulation over a trace of (table, row) accesses: the yardstick for the cache's hit rate.

The trace is a sequence of batches, each an int64 array of keys
(``trace_keys(table, rows)`` packs a table index and row ids into one key).
Two disciplines:

``fill_after_batch=False`` (the textbook LRU)
    every access is looked up in order; a miss is inserted at once (so a
    repeat later in the same batch hits) and the least recently used key is
    evicted when the cache holds more than ``capacity_rows`` keys.
``fill_after_batch=True`` (what the serving cache can do)
    a batch is looked up against the contents at its start (its misses are
    fetched and inserted afterwards), then its keys become most recently used
    in the order of their last access and the least recently used keys are
    evicted down to the capacity.

Offline and per access (an OrderedDict), so keep traces to a few hundred
thousand accesses in tests.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

__all__ = ["LruResult", "simulate_lru", "trace_keys"]

_TABLE_SHIFT = 40  # rows < 2**40 per table


@dataclasses.dataclass(frozen=True, slots=True)
class LruResult:
    hits: int
    lookups: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


def trace_keys(table: int, rows: np.ndarray) -> np.ndarray:
    """One int64 key per access of ``rows`` in ``table``."""
    return (np.int64(table) << _TABLE_SHIFT) | np.asarray(rows, dtype=np.int64)


def simulate_lru(batches: Iterable[np.ndarray], capacity_rows: int, fill_after_batch: bool = False) -> LruResult:
    """Hit count of an LRU cache of ``capacity_rows`` keys over ``batches`` (see the module docstring)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = lookups = 0
    cap = int(capacity_rows)
    for batch in batches:
        keys = np.asarray(batch, dtype=np.int64).tolist()
        lookups += len(keys)
        if cap <= 0:
            continue
        if not fill_after_batch:
            for k in keys:
                if k in cache:
                    cache.move_to_end(k)
                    hits += 1
                else:
                    cache[k] = None
                    if len(cache) > cap:
                        cache.popitem(last=False)
            continue
        hits += sum(1 for k in keys if k in cache)
        # dict.fromkeys on the reversed batch keeps each key's last access; reverse back for recency order.
        for k in reversed(list(dict.fromkeys(reversed(keys)))):
            if k in cache:
                cache.move_to_end(k)
            else:
                cache[k] = None
        while len(cache) > cap:
            cache.popitem(last=False)
    return LruResult(hits=hits, lookups=lookups)
