"""Range routing table: which embedding server holds which rows of which table.

A shard is a half-open row range ``[start, end)`` of one table, mapped to a
server (a list of servers once replicas exist; the first is the primary).
The shards of a table must tile ``[0, rows)`` exactly: a row with no owner is
a configuration error, reported when the table is built, not at lookup time.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from flexemr.errors import ConfigError
from flexemr.model.spec import ModelSpec


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    table: str
    start: int
    end: int
    servers: tuple[int, ...]

    @property
    def server(self) -> int:
        return self.servers[0]


class RoutingTable:
    """Per table: sorted range starts and the server of each range (numpy, for searchsorted)."""

    def __init__(self, spec: ModelSpec, n_servers: int, shards: Iterable[Shard]) -> None:
        self.spec = spec
        self.n_servers = n_servers
        self.shards: tuple[Shard, ...] = tuple(shards)
        problems: list[str] = []
        by_table: dict[str, list[Shard]] = {t.name: [] for t in spec.tables}
        for s in self.shards:
            if s.table not in by_table:
                problems.append(f"shard {s.table}[{s.start}:{s.end}]: unknown table {s.table!r}")
                continue
            if not s.servers or any(not (0 <= v < n_servers) for v in s.servers):
                problems.append(f"shard {s.table}[{s.start}:{s.end}]: server {s.servers} outside 0..{n_servers - 1}")
                continue
            by_table[s.table].append(s)
        self._starts: list[np.ndarray] = []
        self._servers: list[np.ndarray] = []
        self._single: list[int] = []  # the only server of a table, or -1
        for t in spec.tables:
            ranges = sorted(by_table[t.name], key=lambda s: s.start)
            pos = 0
            for s in ranges:
                if s.start != pos:
                    kind = "gap" if s.start > pos else "overlap"
                    problems.append(f"table {t.name!r}: {kind} at row {min(pos, s.start)} (shards must tile [0, {t.rows}))")
                pos = max(pos, s.end)
            if pos != t.rows:
                problems.append(f"table {t.name!r}: shards cover [0, {pos}) but the table has {t.rows} rows")
            self._starts.append(np.array([s.start for s in ranges], dtype=np.int64))
            srv = np.array([s.server for s in ranges], dtype=np.int64)
            self._servers.append(srv)
            self._single.append(int(srv[0]) if len(srv) and (srv == srv[0]).all() else -1)
        # A primary's holders: the servers holding *every* shard of that primary, primary first.
        self._holders: dict[int, tuple[int, ...]] = {}
        for s in self.shards:
            if s.servers and all(0 <= v < n_servers for v in s.servers):
                prev = self._holders.get(s.server)
                self._holders[s.server] = s.servers if prev is None else tuple(v for v in prev if v in s.servers)
        if problems:
            raise ConfigError("invalid routing table:\n  " + "\n  ".join(problems))

    @classmethod
    def build(cls, spec: ModelSpec, n_servers: int, strategy: str = "rows", replicas: int = 1) -> "RoutingTable":
        """Place every table over ``n_servers``, each shard on ``replicas`` distinct servers.

        ``rows``: every table is cut into ``n_servers`` contiguous ranges of equal
        size, so each server holds a slice of every table and every bag fans
        out to all servers (each returns one partial per bag).
        ``tables``: whole tables, largest first onto the least-loaded server,
        so a bag is pooled completely on one server.

        Replicas: a shard whose primary is server ``p`` is also held by servers
        ``p+1, ..., p+R-1`` (mod N).  So server ``s`` holds the shards of primaries
        ``s, s-1, ..., s-R+1``, every server holds R times its primary share, and
        a subrequest for primary ``p`` can go to any of its R holders whole.
        """
        if n_servers < 1:
            raise ConfigError(f"need at least one embedding server, got {n_servers}")
        if not 1 <= replicas <= n_servers:
            raise ConfigError(f"replicas = {replicas}: must be between 1 and the number of embedding servers "
                              f"({n_servers})")

        def holders(p: int) -> tuple[int, ...]:
            return tuple((p + j) % n_servers for j in range(replicas))
        shards: list[Shard] = []
        if strategy == "rows":
            for t in spec.tables:
                cuts = np.linspace(0, t.rows, n_servers + 1).round().astype(np.int64)
                for s in range(n_servers):
                    if cuts[s + 1] > cuts[s]:
                        shards.append(Shard(t.name, int(cuts[s]), int(cuts[s + 1]), holders(s)))
        elif strategy == "tables":
            load = [0] * n_servers
            for t in sorted(spec.tables, key=lambda t: -t.nbytes):
                s = min(range(n_servers), key=lambda i: load[i])
                load[s] += t.nbytes
                shards.append(Shard(t.name, 0, t.rows, holders(s)))
        else:
            raise ConfigError(f"unknown sharding strategy {strategy!r} (expected 'rows' or 'tables')")
        return cls(spec, n_servers, shards)

    def holders_of(self, primary: int) -> tuple[int, ...]:
        """Servers that hold every shard whose primary is ``primary`` (primary first)."""
        return self._holders.get(primary, (primary,))

    @property
    def replicas(self) -> int:
        return min((len(h) for h in self._holders.values()), default=1)

    def shards_of(self, server: int) -> list[Shard]:
        return [s for s in self.shards if server in s.servers]

    def servers_of_table(self, table: int) -> np.ndarray:
        return np.unique(self._servers[table])

    def ranges_of(self, table: int, server: int) -> list[tuple[int, int]]:
        """Row ranges of ``table`` held by ``server`` (merged where adjacent)."""
        starts = self._starts[table]
        ends = np.append(starts[1:], self.spec.tables[table].rows)
        out: list[tuple[int, int]] = []
        for a, b, s in zip(starts.tolist(), ends.tolist(), self._servers[table].tolist()):
            if s != server:
                continue
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out

    def server_of(self, table: int, rows: np.ndarray) -> np.ndarray:
        """Server index of each row id (ids must already be in range)."""
        single = self._single[table]
        if single >= 0:
            return np.full(len(rows), single, dtype=np.int64)
        idx = np.searchsorted(self._starts[table], rows, side="right") - 1
        return self._servers[table][idx]
