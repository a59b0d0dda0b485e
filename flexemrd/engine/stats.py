"""A read-only view of an engine's counters for the publisher thread.

Every counter has one writer thread (sender or receiver, see
connections.py); the view only reads them, copies the recent round trips out
of their fixed-size window, and takes the connection table's condition to
list the connections, so reading it never blocks or corrupts the data path.
The publisher (flexemrd control) calls ``snapshot()`` and reads only that.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from flexemrd.engine.connections import ConnTable


@dataclasses.dataclass(frozen=True, slots=True)
class ConnStats:
    """One owned connection, as of the snapshot."""

    conn_id: int
    server: int
    sent: int
    received: int
    bytes_sent: int
    bytes_received: int
    granted: int
    credits: int              # response slots the server holds now (0 without flow control)
    rtt_ns: list[int]         # recent round trips, up to connections.RTT_WINDOW, unordered

    @property
    def inflight(self) -> int:
        return self.sent - self.received


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStats:
    engine_id: int
    queue_depth: int          # submission-ring messages not yet sent
    subrequests: int          # frames sent since start
    busy_ns: int              # time spent sending them
    initial_credits: int
    connections: dict[int, ConnStats]
    # Response payload bytes the receiver passed by reference (read in place by the ranker), copied into
    # completion-ring slots, and of those copied, in payloads large enough to lend (REF_MIN_PAYLOAD).
    bytes_lent: int = 0
    bytes_copied: int = 0
    large_bytes_copied: int = 0
    # Cache fills answered by one-sided RDMA READ (reads.py), and the rows they carried.
    fills_read: int = 0
    rows_read: int = 0

    @property
    def inflight(self) -> int:
        return sum(c.inflight for c in self.connections.values())


class _Depth(Protocol):
    def depth(self) -> int: ...


class _SenderCounters(Protocol):
    subrequests: int
    busy_ns: int


class _PayloadCounters(Protocol):
    bytes_lent: int
    bytes_copied: int
    large_bytes_copied: int


class _ReadCounters(Protocol):
    fills_read: int
    rows_read: int


class EngineStatsView:
    """Safe to read from any thread of the engine process (see module docstring)."""

    def __init__(self, engine_id: int, table: ConnTable, submission: _Depth, sender: _SenderCounters,
                 initial_credits: int, payloads: _PayloadCounters | None = None,
                 reads: _ReadCounters | None = None) -> None:
        self.engine_id = engine_id
        self._payloads = payloads
        self._reads = reads
        self._table = table
        self._sub = submission
        self._sender = sender
        self._initial = initial_credits

    def snapshot(self) -> EngineStats:
        conns = {}
        for cid, st in self._table.items():
            received = st.received
            conns[cid] = ConnStats(
                conn_id=cid, server=st.conn.server, sent=st.sent, received=received, bytes_sent=st.bytes_sent,
                bytes_received=st.bytes_received, granted=st.granted,
                credits=max(0, self._initial + st.granted - received) if self._initial else 0,
                rtt_ns=st.rtt.recent())
        p, r = self._payloads, self._reads
        return EngineStats(self.engine_id, self._sub.depth(), self._sender.subrequests, self._sender.busy_ns,
                           self._initial, conns,
                           bytes_lent=p.bytes_lent if p else 0, bytes_copied=p.bytes_copied if p else 0,
                           large_bytes_copied=p.large_bytes_copied if p else 0,
                           fills_read=r.fills_read if r else 0, rows_read=r.rows_read if r else 0)
