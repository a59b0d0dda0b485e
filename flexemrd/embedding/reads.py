"""Table memory an embedding server registers for rankers' cache fills by one-sided RDMA READ.

When a ranker that reads connection-blob version 2 opens an RDMA data
connection, the server lists in its HELLO blob every shard it may READ
(``ReadTable``: model version, table, first row, rows, address, rkey, row
stride, dim, dtype).  Registrations are made once per (model version, table,
shard) and shared by every connection of the process, not per connection.

Which memory: the pooler's own array where the device accepts it, as a
read-only registration (remote READ only, so pinning never breaks a
copy-on-write page).  A boot version's table is a *shared* read-only file
mapping, which soft-RoCE on Debian's 6.1 kernel refuses (EFAULT); it is then
mapped a second time, privately (``map_table``: the same file, the same page
cache pages as long as nobody writes them, and nobody does).  A delta
version's array is already private and holds the delta's rows: it is
registered itself, never re-mapped from the file (that would lose them).
Refused altogether: nothing is advertised for that shard and its fills go
as FETCH frames; the endpoint logs which way each goes (``cache fills of t0:
RDMA READ (...)`` / ``cache fills of t0: FETCH frames (RDMA READ
unavailable: ...)``).

Hazards, and why they cannot bite:

- torn rows: no row of a version is ever written once it is held (a delta
  writes its rows into a new copy-on-write map *before* the version is added
  to the store; store.py replaces whole dicts, never rows), so a READ can
  never see a row half old, half new.
- freed or reused memory: a ``Region`` keeps its array (and so its mapping)
  alive; a version's registrations are kept while it is held and, after it
  is retired, until every connection that was told about them is closed.
  Only then are they deregistered (``sweep``, run at each advertisement and
  each retirement).  A ranker therefore never reads memory that was freed or
  given to something else.
- new versions: a connection is told about the versions held when it
  connected; a FETCH naming a later version is not advertised there and
  goes as a FETCH frame (a reconnection advertises the versions held then).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import Any

import numpy as np

from flexemr.transport.rdma.blob import DTYPE_F32, MAX_TABLES, ReadTable

from flexemrd.embedding.store import EmbeddingStore

__all__ = ["ReadRegistry"]

logger = logging.getLogger(__name__)

_Key = tuple[int, int, int]   # (model version, table id, first row)


@dataclasses.dataclass(slots=True)
class _Registration:
    region: Any                      # flexemr.transport.rdma.endpoint.Region (None: refused)
    entry: ReadTable | None
    told: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)   # connections advertised to


class ReadRegistry:
    """One per embedding server process; thread-safe (event loop + a version loader's retire)."""

    def __init__(self, store: EmbeddingStore, endpoint_fn) -> None:
        self.store = store
        self._endpoint_fn = endpoint_fn      # () -> this process's Endpoint (opened on first use)
        self._lock = threading.Lock()
        self._regs: dict[_Key, _Registration] = {}
        self._capped = False

    # ------------------------------------------------------------------ advertising

    def advertise(self) -> tuple[tuple[ReadTable, ...], int]:
        """(the shards a new connection may READ, the boot version); registers what is not yet."""
        with self._lock:
            self._sweep()
            entries: list[ReadTable] = []
            # Newest versions first: a ranker switching versions wants the new one's rows.
            for version in sorted(self.store.versions, reverse=True):
                held = self.store.versions[version]
                for tid, ht in sorted(held.tables.items()):
                    for start, end in zip(ht.starts.tolist(), ht.ends.tolist()):
                        reg = self._regs.get((version, tid, start))
                        if reg is None:
                            reg = self._regs[(version, tid, start)] = self._register(version, tid, ht, start, end)
                        if reg.entry is not None:
                            entries.append(reg.entry)
            if len(entries) > MAX_TABLES:
                if not self._capped:
                    logger.warning("cache fills: %d shards registered for RDMA READ, a connection blob lists %d; "
                                   "fills of the others go as FETCH frames", len(entries), MAX_TABLES)
                    self._capped = True
                entries = entries[:MAX_TABLES]
            return tuple(entries), int(self.store.boot_version)

    def bind(self, conn: Any) -> None:
        """``conn`` (an RdmaConnection, after the upgrade) was told about ``conn.advertised``."""
        advertised = getattr(conn, "advertised", ())
        if not advertised:
            return
        with self._lock:
            for t in advertised:
                reg = self._regs.get((t.model_version, t.table_id, t.first_row))
                if reg is not None:
                    reg.told.add(conn)

    # ------------------------------------------------------------------ lifetime

    def sweep(self) -> int:
        """Deregister retired versions' shards no open connection was told about; returns how many."""
        with self._lock:
            return self._sweep()

    def _sweep(self) -> int:
        held = self.store.versions
        gone = [k for k, r in self._regs.items()
                if k[0] not in held and not any(getattr(c, "stream", None) is not None for c in list(r.told))]
        for k in gone:
            reg = self._regs.pop(k)
            if reg.region is not None:
                reg.region.close()
        if gone:
            logger.info("cache fills: deregistered %d shard%s of retired model versions", len(gone),
                        "" if len(gone) == 1 else "s")
        return len(gone)

    def close(self) -> None:
        with self._lock:
            for reg in self._regs.values():
                if reg.region is not None:
                    reg.region.close()
            self._regs.clear()

    # ------------------------------------------------------------------ registering

    def _register(self, version: int, tid: int, ht: Any, start: int, end: int) -> _Registration:
        table = ht.pooler.table
        name = ht.name
        detail = f"rows [{start}, {end}) of model version {version}"
        if table.dtype != np.float32 or table.ndim != 2 or not table[start:end].flags.c_contiguous:
            logger.info("cache fills of %s: FETCH frames (RDMA READ unavailable: %s is %s %s, not contiguous "
                        "float32 rows)", name, detail, table.dtype, table.shape)
            return _Registration(None, None)
        endpoint = self._endpoint_fn()
        fallback = None
        if getattr(table, "mode", None) == "r" and getattr(table, "filename", None):
            # A shared read-only file map (the boot version): a private map of the same file registers.
            path = table.filename

            def fallback() -> np.ndarray:
                from flexemr.transport.rdma.endpoint import map_table

                return _read_only(map_table(path)[start:end])
        region = endpoint.register_for_reads(_read_only(table[start:end]), name, detail=detail, fallback=fallback)
        if region is None:
            return _Registration(None, None)
        dim = int(table.shape[1])
        entry = ReadTable(table_id=tid, model_version=version, first_row=start, rows=end - start,
                          addr=region.addr, rkey=region.rkey, row_bytes=4 * dim, dim=dim, dtype=DTYPE_F32)
        return _Registration(region, entry)


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view: registered for remote READ only (pinning never writes, so never copies, a page)."""
    v = a.view(np.ndarray)
    v.flags.writeable = False
    return v
