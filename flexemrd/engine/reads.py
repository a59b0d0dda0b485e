"""Cache fills by one-sided RDMA READ: a FETCH the server never sees, answered as if it had.

The inference sends a cache fill as a FETCH frame (table, ids, model
version) through the submission ring.  Over RDMA, when the connection's
server advertised the table's rows for that version in its HELLO blob
(``RdmaConnection.read_tables``, flexemrd/embedding/reads.py), the sender
hands the FETCH here instead of to the connection::

    sender thread                                   receiver thread
    try_read(cid, frame)                            land(st)   (the stream's fd woke)
      plan_read: every id inside an advertised        take_reads(): READs done per fill
        shard of (table, version)? else FETCH          all done -> reserve a completion-ring slot,
      spans of sorted ids (gaps <= GAP_ROWS read        FETCH_RESP header + (table, dim) + rows
        through): one READ per span, chained            gathered from staging in the FETCH's
        into one doorbell, into a registered             order -> commit
        staging slot of this connection
      st.sent += 1 (drain and retirement wait for it)   st.received += 1

So the ranker's cache code sees exactly the completion a FETCH_RESP would
produce (aux = the version served) and does not change, and the embedding
server's CPU does nothing: its FETCH counter stays where it was.  The rows
are copied once, staging -> completion slot, in the same numpy gather that
puts them in the FETCH's order (the completion-ring slot cannot be reserved
while READs are in flight: the receiver lands other answers meanwhile).

Falls back to the FETCH frame (counted, logged once per connection and
reason): TCP/shm connections, servers that advertised nothing (v1 peers,
refused registrations), other model versions, ids outside the advertised
rows (the server then answers with its usual error), fills larger than a
staging slot, or no free slot.  A READ that fails is an error completion:
the stream raises ``QueuePairError``, the receiver handles the connection as
lost, and the inference fails the fills in flight on it, exactly like a lost
FETCH (the rows stay uncached).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import struct
import threading
import time
from typing import Any, Sequence

import numpy as np

from flexemr.transport.rdma.blob import ReadTable
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, FrameType, Header, unpack_header

from flexemrd.engine.completions import CompletionWriter
from flexemrd.engine.connections import ConnState, ConnTable

__all__ = ["CacheReads", "ReadPlan", "plan_read"]

logger = logging.getLogger(__name__)

GAP_ROWS = 8                 # read through gaps of up to this many rows: one READ instead of two
# Fills in flight per connection by READ: the inference sends one fill per (server, table) after a
# batch, so a server holding 8 tables may get 8 at once (16 MiB registered per connection).
STAGING_SLOTS = 8
STAGING_SLOT_BYTES = 2 << 20
SUMMARY_EVERY_S = 5.0
_RESERVE_SLICE_S = 0.5
_TABLE_DIM = struct.Struct("<II")
_TYPE_AT = struct.Struct("<H")     # the frame header's type, at offset 6


@dataclasses.dataclass(frozen=True, slots=True)
class ReadPlan:
    """How to READ one FETCH: spans of rows per advertised shard, and where each id's row lands."""

    entries: tuple[ReadTable, ...]   # the shard of each group
    groups: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]   # (staging byte offset, bytes, remote offset)
    positions: np.ndarray            # staging row of each id of the FETCH, in its order
    staging_rows: int
    dim: int
    row_bytes: int

    @property
    def reads(self) -> int:
        return sum(len(g[0]) for g in self.groups)

    def misfit(self, slot_bytes: int) -> str:
        """Why a READ of this plan would leave its staging slot or its shard's rows ('' if none would)."""
        for entry, (local, nbytes, remote) in zip(self.entries, self.groups):
            if (nbytes <= 0).any() or (local < 0).any() or (local + nbytes > slot_bytes).any() \
                    or (remote < 0).any() or (remote + nbytes > entry.rows * entry.row_bytes).any():
                return (f"a READ of table {entry.table_id} rows [{entry.first_row}, +{entry.rows}) leaves its "
                        f"{slot_bytes}-byte staging slot or the shard")
        return ""


def plan_read(tables: Sequence[ReadTable], table_id: int, version: int, ids: np.ndarray) -> ReadPlan | str:
    """The READs that answer a FETCH of ``ids`` of ``table_id`` at ``version``, or why it must go as a frame."""
    mine = sorted((t for t in tables if t.table_id == table_id and t.model_version == version),
                  key=lambda t: t.first_row)
    if not mine:
        if any(t.table_id == table_id for t in tables):
            return f"model version {version} of table {table_id} is not advertised"
        return f"table {table_id} is not advertised"
    if len(ids) == 0:
        return "no ids"
    dims = {(t.dim, t.row_bytes) for t in mine}
    if len(dims) != 1:
        return f"shards of table {table_id} disagree on dim/row stride {sorted(dims)}"
    dim, row_bytes = dims.pop()
    u, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
    starts = np.array([t.first_row for t in mine], dtype=np.int64)
    ends = starts + np.array([t.rows for t in mine], dtype=np.int64)
    k = np.searchsorted(starts, u, side="right") - 1
    if (k < 0).any() or (u >= ends[np.maximum(k, 0)]).any():
        bad = int(u[np.argmax((k < 0) | (u >= ends[np.maximum(k, 0)]))])
        return f"id {bad} of table {table_id} is outside the advertised rows"
    # Spans: break where the gap is too wide or the shard changes.
    brk = np.ones(len(u), dtype=bool)
    brk[1:] = (np.diff(u) > GAP_ROWS) | (np.diff(k) != 0)
    first_idx = np.flatnonzero(brk)
    last_idx = np.append(first_idx[1:] - 1, len(u) - 1)
    span_first, span_last = u[first_idx], u[last_idx]
    span_rows = span_last - span_first + 1
    span_stage = np.concatenate(([0], np.cumsum(span_rows)[:-1]))
    span_of = np.cumsum(brk) - 1
    pos_u = span_stage[span_of] + (u - span_first[span_of])
    span_entry = k[first_idx]
    groups = []
    entries = []
    for e in np.unique(span_entry).tolist():
        sel = span_entry == e
        entries.append(mine[e])
        groups.append((span_stage[sel] * row_bytes, span_rows[sel] * row_bytes,
                       (span_first[sel] - mine[e].first_row) * row_bytes))
    return ReadPlan(tuple(entries), tuple(groups), pos_u[inverse], int(span_rows.sum()), dim, row_bytes)


@dataclasses.dataclass(slots=True)
class _Fill:
    conn: Any                 # the RdmaConnection it was posted on
    cid: int
    rid: int
    table_id: int
    version: int
    plan: ReadPlan
    slot: int
    posted: list[int]         # per group: READs posted so far
    done: int = 0


class _Staging:
    """A connection's registered landing area: STAGING_SLOTS slots of STAGING_SLOT_BYTES."""

    def __init__(self, endpoint: Any) -> None:
        self.array = np.zeros(STAGING_SLOTS * STAGING_SLOT_BYTES, dtype=np.uint8)
        self.region = endpoint.register(self.array)   # local write: the NIC writes the READ's rows here
        self.free = list(range(STAGING_SLOTS))

    def close(self) -> None:
        self.region.close()


class CacheReads:
    """One per engine over RDMA (see the module docstring); counters are read by the stats view."""

    def __init__(self, table: ConnTable, completions: CompletionWriter, engine_id: int,
                 stop: threading.Event | None = None) -> None:
        self.table = table
        self.stop = stop or threading.Event()
        self.completions = completions
        self.engine_id = engine_id
        self._lock = threading.Lock()
        self._fills: dict[int, _Fill] = {}          # tag -> fill in flight
        self._staging: dict[int, tuple[Any, _Staging]] = {}   # id(conn) -> (conn, staging)
        self._tags = itertools.count(1)
        self._said: set[tuple[int, str]] = set()
        self._last_summary = 0.0
        self._summarised = (0, 0)
        # Counters (sender writes fills_*, fetch_frames; receiver writes the landed ones).
        self.fills_posted = 0
        self.fills_read = 0        # fills answered by READ (landed in the completion ring)
        self.rows_read = 0         # rows those fills carried
        self.reads_posted = 0      # READ work requests
        self.fetch_frames = 0      # FETCHes on RDMA connections that went as frames (the server answers)

    # ------------------------------------------------------------ sender thread

    def try_read(self, cid: int, frame: memoryview) -> bool:
        """Answer this submission-ring frame by RDMA READ?  True: posted (do not send it); False: send it."""
        if not _is_fetch(frame):
            return False
        st = self.table.get(cid)
        conn = st.conn if st is not None else None
        tables = getattr(conn, "read_tables", ())
        if not tables:
            if conn is not None and getattr(conn, "transport_name", "") == "rdma":
                self.fetch_frames += 1
                self._say(cid, "the server advertised no table rows for RDMA READ")
            return False
        h = unpack_header(frame[:HEADER_SIZE])
        payload = frame[HEADER_SIZE:HEADER_SIZE + h.payload_len]
        try:
            table_id, ids = codec.decode_fetch(payload)
        except Exception:
            return False   # malformed: the server says what is wrong
        version = codec.fetch_version(payload, h.flags) or conn.boot_version
        plan = plan_read(tables, table_id, version, ids)
        if not isinstance(plan, ReadPlan):
            return self._fetch_instead(cid, plan)
        if plan.staging_rows * plan.row_bytes > STAGING_SLOT_BYTES:
            return self._fetch_instead(cid, f"a fill of {plan.staging_rows} rows needs more than the "
                                            f"{STAGING_SLOT_BYTES} bytes of a staging slot")
        bad = plan.misfit(STAGING_SLOT_BYTES)
        if bad:   # checked whole before any READ is posted: a READ refused half-way would leave its fill unanswered
            logger.error("cache fill on connection %d: %s; sent as a FETCH frame", cid, bad)
            return self._fetch_instead(cid, "a READ plan was out of bounds")
        with self._lock:
            staging = self._staging_of(conn)
            if not staging.free:
                return self._fetch_instead(cid, "every staging slot is in use")
            tag = next(self._tags)
            fill = _Fill(conn, cid, h.request_id, table_id, version, plan, staging.free.pop(), [0] * len(plan.groups))
            self._fills[tag] = fill
            try:
                self._pump(tag, fill, staging)
            except (ConnectionError, OSError):
                self._drop(tag, fill)
                return False   # the QP failed: the frame's send fails too and reports the loss
        st.sent += 1   # answered by land(): drain and retirement wait for it like for any answer
        self.fills_posted += 1
        if (cid, "read") not in self._said:
            self._said.add((cid, "read"))
            logger.info("cache fills on connection %d (server %d): RDMA READ (%d shards advertised)", cid,
                        conn.server, len(tables))
        return True

    def _fetch_instead(self, cid: int, why: str) -> bool:
        self.fetch_frames += 1
        self._say(cid, why)
        self._summary()
        return False

    def _say(self, cid: int, why: str) -> None:
        if (cid, why) not in self._said:
            self._said.add((cid, why))
            logger.info("cache fills on connection %d: FETCH frames (%s)", cid, why)

    # ------------------------------------------------------------ receiver thread

    def land(self, st: ConnState) -> None:
        """Write the completion of every fill on ``st`` whose READs are all done; post what waits.

        Raises ConnectionError (QueuePairError) when a READ failed: the caller
        handles the connection as lost, and its fills in flight are forgotten.
        """
        conn = st.conn
        stream = getattr(conn, "stream", None)
        if stream is None or not self._fills:
            return
        try:
            done = stream.take_reads()
        except (ConnectionError, OSError):
            self.forget(conn)
            raise
        finished = []
        with self._lock:
            for tag, n in done.items():
                fill = self._fills.get(tag)
                if fill is not None:
                    fill.done += n
            for tag, fill in list(self._fills.items()):
                if fill.conn is not conn:
                    continue
                if fill.done >= fill.plan.reads:
                    finished.append((tag, fill))
                    del self._fills[tag]
                else:
                    try:
                        self._pump(tag, fill, self._staging[id(conn)][1])
                    except (ConnectionError, OSError):
                        self.forget_locked(conn)
                        raise
        for tag, fill in finished:
            self._write(st, fill)
        self._summary()

    def _write(self, st: ConnState, fill: _Fill) -> None:
        plan = fill.plan
        n = len(plan.positions)
        h = Header(FrameType.FETCH_RESP, 0, fill.version, fill.rid, _TABLE_DIM.size + n * plan.dim * 4)
        view = None
        while view is None:
            view = self.completions.reserve_frame(fill.cid, h, timeout=_RESERVE_SLICE_S)
            if view is None and self.stop.is_set():
                return   # shutting down: nobody reads the ring any more
        _, staging = self._staging[id(fill.conn)]
        base = fill.slot * STAGING_SLOT_BYTES
        rows = staging.array[base:base + plan.staging_rows * plan.row_bytes].view("<f4").reshape(
            plan.staging_rows, plan.row_bytes // 4)[:, :plan.dim]
        _TABLE_DIM.pack_into(view, 0, fill.table_id, plan.dim)
        out = np.frombuffer(view, dtype="<f4", offset=_TABLE_DIM.size, count=n * plan.dim).reshape(n, plan.dim)
        np.take(rows, plan.positions, axis=0, out=out)
        with self._lock:
            # Free before the commit: once the inference sees this answer it may send the next
            # fill, and the sender must find the slot free (else it falls back to a FETCH frame).
            staging.free.append(fill.slot)
        self.completions.commit_frame()
        st.received += 1
        self.fills_read += 1
        self.rows_read += n

    # ------------------------------------------------------------ any thread (lock held where said)

    def _pump(self, tag: int, fill: _Fill, staging: _Staging) -> None:
        """Post the fill's READs that wait, as many as the stream takes now."""
        stream = fill.conn.stream
        if stream is None:
            raise ConnectionError(f"connection {fill.cid} closed")
        base = fill.slot * STAGING_SLOT_BYTES
        for g, (local, nbytes, remote) in enumerate(fill.plan.groups):
            k = fill.posted[g]
            if k >= len(local):
                continue
            n = stream.post_reads(staging.region, local[k:] + base, nbytes[k:], fill.plan.entries[g].region(),
                                  remote[k:], tag)
            fill.posted[g] += n
            self.reads_posted += n
            if fill.posted[g] < len(local):
                return   # the stream is full: the rest goes when READs complete (land)

    def _staging_of(self, conn: Any) -> _Staging:
        # Fills and staging areas of closed connections go first (lost connections: the inference
        # failed their fills on COMP_LOST; a reconnect brings a new connection object).
        for tag, f in list(self._fills.items()):
            if getattr(f.conn, "stream", None) is None:
                self._drop(tag, f)
        for key, (c, s) in list(self._staging.items()):
            if getattr(c, "stream", None) is None and not any(f.conn is c for f in self._fills.values()):
                s.close()
                del self._staging[key]
        got = self._staging.get(id(conn))
        if got is None:
            got = self._staging[id(conn)] = (conn, _Staging(conn.stream.ep))
        return got[1]

    def _drop(self, tag: int, fill: _Fill) -> None:
        self._fills.pop(tag, None)
        got = self._staging.get(id(fill.conn))
        if got is not None:
            got[1].free.append(fill.slot)

    def forget(self, conn: Any) -> None:
        """``conn`` is lost: its fills in flight are failed by the inference (COMP_LOST), not here."""
        with self._lock:
            self.forget_locked(conn)

    def forget_locked(self, conn: Any) -> None:
        for tag, fill in list(self._fills.items()):
            if fill.conn is conn:
                self._drop(tag, fill)

    def _summary(self) -> None:
        now = time.monotonic()
        state = (self.fills_read, self.fetch_frames)
        if now - self._last_summary < SUMMARY_EVERY_S or state == self._summarised:
            return
        self._last_summary, self._summarised = now, state
        logger.info("cache fills so far: %d by RDMA READ (%d rows, %d READs), %d as FETCH frames",
                    self.fills_read, self.rows_read, self.reads_posted, self.fetch_frames)

    def snapshot(self) -> dict[str, int]:
        return {"fills_read": self.fills_read, "rows_read": self.rows_read, "reads_posted": self.reads_posted,
                "fetch_frames": self.fetch_frames, "fills_posted": self.fills_posted}


def _is_fetch(frame: memoryview) -> bool:
    """Is this whole frame a FETCH?  (Only the header's type field is read: every LOOKUP passes here.)"""
    return len(frame) >= HEADER_SIZE and _TYPE_AT.unpack_from(frame, 6)[0] == FrameType.FETCH
