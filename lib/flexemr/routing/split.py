"""Split a batch into per-server subrequests (the first half of hierarchical pooling).

Hierarchical pooling (FlexEMR 3.1.2): each server pools the ids it holds for a
bag into one partial vector; the ranker combines the partials of a bag in
:mod:`flexemr.routing.combine` (``combine_partials`` is re-exported here for
older callers).  The split also yields each server's id count per bag, which
mean pooling divides by.

Subrequests are *compact* (protocol 3): a server gets only the bags that
have ids for it.  A bag with no ids there (empty, all its ids on other
shards, or all of them hit the ranker's cache) costs that server nothing and
the wire nothing; a table with no such bag is left out of the server's
subrequest, and a server with no table at all gets none.  ``ServerPart.rows``
keeps which bags each table sent (None: all of them, the common case that
needs no scatter), so no index list crosses the wire: the answer has one
partial per bag sent, in that order, and :class:`~flexemr.routing.combine.Accumulator`
scatters it back.

Everything is whole-array numpy: per table and server one range mask, one
compress, one cumsum and one flatnonzero; no sort, no per-id bag index, no
loop over bags.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from flexemr.routing.combine import combine_partials  # noqa: F401  (its old home)
from flexemr.routing.table import RoutingTable


@dataclasses.dataclass(slots=True)
class ServerPart:
    """The subrequest for one server: tables in model order, a compact KJT per table.

    ``lengths[i]`` has one entry per bag sent (every one > 0 unless ``rows[i]``
    is None); ``rows[i]`` lists those bags' positions in the batch (int64,
    ascending), or is None when every bag of the batch was sent.
    """

    server: int
    tables: list[int] = dataclasses.field(default_factory=list)
    lengths: list[np.ndarray] = dataclasses.field(default_factory=list)  # int32 [bags sent] per table
    values: list[np.ndarray] = dataclasses.field(default_factory=list)   # int64 per table
    rows: list[np.ndarray | None] = dataclasses.field(default_factory=list)

    def add(self, table: int, values: np.ndarray, lengths: np.ndarray, batch: int) -> None:
        """Take ``table``'s sub-bags [batch] for this server, keeping only the bags with ids (caller: some have)."""
        rows = np.flatnonzero(lengths)
        self.tables.append(table)
        self.values.append(values)
        if len(rows) == batch:
            self.lengths.append(lengths)
            self.rows.append(None)
        else:
            self.lengths.append(lengths[rows])
            self.rows.append(rows)

    def bags_sent(self) -> int:
        """(bag, table) pairs this subrequest carries: the partials that will come back."""
        return sum(len(ln) for ln in self.lengths)


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
    """Route ids of ``tables`` (model indices) to servers, compactly.

    A server gets a table only when some bag has ids for it, and then only
    those bags (see the module docstring); ``SplitPlan.parts`` holds only
    servers with work.  A batch whose ids all hit the cache has no part.
    """
    parts: dict[int, ServerPart] = {}

    def part(s: int) -> ServerPart:
        p = parts.get(s)
        if p is None:
            p = parts[s] = ServerPart(s)
        return p

    for t, v, ln in zip(tables, values, lengths):
        if not len(v):
            continue                       # no ids at all: no server hears of this table
        servers = routing.servers_of_table(t)
        if len(servers) == 1:
            # Whole table on one server: the caller's arrays as they are, less the empty bags.
            part(int(servers[0])).add(t, v, ln, batch)
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
        left = len(v)
        last = len(servers) - 1
        for k, s in enumerate(servers):
            s = int(s)
            if k == last:
                if left:
                    rest = ~taken
                    part(s).add(t, np.compress(rest, v), (ln - counted).astype(np.int32), batch)
                break
            mask = None
            for lo, hi in routing.ranges_of(t, s):
                m = (v >= lo) & (v < hi) if lo > 0 else (v < hi)
                mask = m if mask is None else (mask | m)
            np.cumsum(mask, out=csum[1:])
            mine = int(csum[-1])
            if mine:
                cnt = csum[offsets[1:]] - csum[offsets[:-1]]
                part(s).add(t, np.compress(mask, v), cnt.astype(np.int32), batch)
                counted += cnt
                left -= mine
            taken = mask if taken is None else (taken | mask)
    return SplitPlan(batch, parts)
