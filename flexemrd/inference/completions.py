"""The completion thread: the only reader of the engines' completion rings.

One doorbell serves every ring: the thread wakes once, drains each ring, and
for every message finds the batch (or cache fill) waiting for it in the
pending table.  Lost connections fail their subrequests at once; migrations
are reported to the listener given at construction (the control package).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

from flexemr import enginemsg as em
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, FrameType, unpack_header

from flexemrd.inference.batch import Batch
from flexemrd.inference.pending import PendingTable

logger = logging.getLogger(__name__)


class MigrationListener(Protocol):
    def migrated(self, conn: int, engine: int) -> None: ...


class Completions:
    def __init__(self, rings: list, doorbell, pending: PendingTable, finish: Callable[[Batch], None],
                 connections: dict[int, tuple[int, str]], request_timeout_s: float, cache=None,
                 on_migrated: MigrationListener | None = None, beat: Callable[[], None] = lambda: None) -> None:
        self.rings = rings
        self.doorbell = doorbell
        self.pending = pending
        self.finish = finish
        self.connections = connections
        self.request_timeout_s = request_timeout_s
        self.cache = cache
        self.on_migrated = on_migrated
        self.beat = beat
        self.completed: dict[int, int] = {c: 0 for c in connections}

    def run(self, stop) -> None:
        last_check = time.monotonic()
        while not stop.is_set():
            self.beat()
            self.doorbell.wait(0.2)
            self.drain()
            now = time.monotonic()
            if now - last_check > 1.0:
                last_check = now
                self.expire()

    def drain(self) -> int:
        """Handle every message waiting in the rings; returns how many."""
        n = 0
        for ring in self.rings:
            while True:
                msg = ring.peek()
                if msg is None:
                    break
                try:
                    self.handle(msg.kind, msg.data)
                except Exception:
                    logger.exception("bad completion")
                finally:
                    msg.release()
                n += 1
        return n

    def handle(self, kind: int, data: memoryview) -> None:
        cid, arg = em.PREFIX.unpack_from(data, 0)
        if kind == em.COMP_FRAME:
            h = unpack_header(data[em.PREFIX_SIZE : em.PREFIX_SIZE + HEADER_SIZE])
            payload = data[em.PREFIX_SIZE + HEADER_SIZE : em.PREFIX_SIZE + HEADER_SIZE + h.payload_len]
            if h.type == FrameType.LOOKUP_RESP:
                self.completed[cid] = self.completed.get(cid, 0) + 1
                batch = self.pending.take_lookup(h.request_id)
                if batch is not None and batch.complete(h.request_id, payload):
                    self.finish(batch)
            elif h.type == FrameType.FETCH_RESP:
                self._fill_done(h.request_id, payload)
            elif h.type == FrameType.ERROR:
                if self._fill_done(h.request_id, None):
                    return
                self.completed[cid] = self.completed.get(cid, 0) + 1
                self.fail(h.request_id, f"embedding server {self.connections[cid][0]}: {codec.decode_error(payload)}")
        elif kind == em.COMP_LOST:
            reason = bytes(data[em.PREFIX_SIZE :]).decode("utf-8", "replace")
            lookups, fills = self.pending.on_connection(cid)
            for rid in lookups:
                self.fail(rid, reason)
            for rid in fills:
                self._fill_done(rid, None)
        elif kind == em.COMP_MIGRATED:
            logger.info("connection %d now lives in engine %d", cid, arg)
            if self.on_migrated is not None:
                self.on_migrated.migrated(cid, arg)

    def fail(self, rid: int, error: str) -> None:
        batch = self.pending.take_lookup(rid)
        if batch is not None and batch.fail(rid, error):
            self.finish(batch)

    def _fill_done(self, rid: int, payload: memoryview | None) -> bool:
        """Completion of a cache fill (False if ``rid`` is not a fill)."""
        fill = self.pending.take_fill(rid)
        if fill is None:
            return False
        data = None
        if payload is not None:
            tid, data = codec.decode_fetch_response(payload)
            if tid != fill.table:
                data = None
        if self.cache is not None:
            self.cache.filled(fill.table, fill.rows, data)
        return True

    def expire(self) -> None:
        limit = time.perf_counter() - self.request_timeout_s
        for rid in self.pending.older_than(limit):
            self.fail(rid, f"no answer from the embedding servers within {self.request_timeout_s:g} s")
