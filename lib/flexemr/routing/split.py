"""Split a batch into per-server subrequests (the first half of hierarchical pooling).

Hierarchical pooling (FlexEMR 3.1.2): each server pools the ids it holds for a
bag into one partial vector; the ranker combines the partials of a bag in
:mod:`flexemr.routing.combine` (``combine_partials`` is re-exported here for
older callers).  The split also yields each server's id count per bag, which
mean pooling divides by.

Everything is whole-array numpy: per table and server one range mask, one
compress and one cumsum; no sort, no per-id bag index, no loop over bags.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from flexemr.routing.combine import combine_partials  # noqa: F401  (its old home)
from flexemr.routing.table import RoutingTable


@dataclasses.dataclass(slots=True)
class ServerPart:
    """The subrequest for one server: tables in model order, KJT per table."""

    server: int
    tables: list[int] = dataclasses.field(default_factory=list)
    lengths: list[np.ndarray] = dataclasses.field(default_factory=list)  # int32 [B] per table
    values: list[np.ndarray] = dataclasses.field(default_factory=list)   # int64 per table


@dataclasses.dataclass(slots=True)
class SplitPlan:
    batch: int
    parts: dict[int, ServerPart]  # server -> its subrequest (only servers with work)


def split_batch(
    routing: RoutingTable,
    batch: int,
    tables: Sequence[int],
    values: Sequence[np.ndarray],
    lengths: Sequence[np.ndarray],
) -> SplitPlan:
    """Route ids of ``tables`` (model indices) to servers.

    A server gets a subrequest for a table whenever it holds rows of it and the
    table has ids in the batch, even if none of them land on that server: its
    lengths are then all zero.  That keeps per-server layouts predictable
    (the receiver can size its buffer from the table list alone).
    """
    parts: dict[int, ServerPart] = {}

    def part(s: int) -> ServerPart:
        p = parts.get(s)
        if p is None:
            p = parts[s] = ServerPart(s)
        return p

    for t, v, ln in zip(tables, values, lengths):
        servers = routing.servers_of_table(t)
        if len(servers) == 1:
            # Whole table on one server: forward the caller's arrays as they are.
            p = part(int(servers[0]))
            p.tables.append(t)
            p.values.append(v)
            p.lengths.append(ln)
            continue
        # One boolean mask per server (its row ranges).  np.compress keeps ids
        # in bag order (4x faster than boolean indexing on random masks); per-bag
        # counts come from a cumsum read at the bag offsets.  The shards tile the
        # table, so the last server takes the complement of the others: no
        # compare and no cumsum for it.
        offsets = np.zeros(batch + 1, dtype=np.int64)
        np.cumsum(ln, out=offsets[1:])
        csum = np.empty(len(v) + 1, dtype=np.int64)
        csum[0] = 0
        taken: np.ndarray | None = None
        counted = np.zeros(batch, dtype=np.int64)
        last = len(servers) - 1
        for k, s in enumerate(servers):
            s = int(s)
            p = part(s)
            p.tables.append(t)
            if k == last:
                rest = ~taken
                p.values.append(np.compress(rest, v))
                p.lengths.append((ln - counted).astype(np.int32))
                break
            mask = None
            for lo, hi in routing.ranges_of(t, s):
                m = (v >= lo) & (v < hi) if lo > 0 else (v < hi)
                mask = m if mask is None else (mask | m)
            p.values.append(np.compress(mask, v))
            np.cumsum(mask, out=csum[1:])
            cnt = csum[offsets[1:]] - csum[offsets[:-1]]
            p.lengths.append(cnt.astype(np.int32))
            counted += cnt
            taken = mask if taken is None else (taken | mask)
    return SplitPlan(batch, parts)
