"""The completion thread: the only reader of the engines' completion rings.

One doorbell serves every ring: the thread wakes once, drains each ring, and
for every message finds the batch (or cache fill) waiting for it in the
pending table.  A lost connection's subrequests are re-issued to a live
replica at once, or failed naming the server; migrations are reported to the
listener given at construction (the control package).

A COMP_REF message carries no payload: it names the shm response ring the
partial landed in (landing.py maps it); the partial is read there, folded in
like any other, and the space given back at once.  A
reference whose ring is gone (its server died and was swept meanwhile) is
treated as that part lost: re-issued to a replica, or failed naming the server.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

from flexemr import enginemsg as em
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, ErrorCode, FrameType, Header, unpack_header

from flexemrd.inference.batch import Batch, Part
from flexemrd.inference.health import ServerHealth
from flexemrd.inference.landing import LandingMaps
from flexemrd.inference.lookups import LookupEncoder
from flexemrd.inference.pending import PendingTable
from flexemrd.inference.stats import FailoverCounters
from flexemrd.inference.submission import Submitter

logger = logging.getLogger(__name__)

RESCUE_MIN_S = 1.0     # without hedging: a part this old (and RESCUE_FACTOR x its server's median) goes to a replica
RESCUE_FACTOR = 20.0


class MigrationListener(Protocol):
    def migrated(self, conn: int, engine: int) -> None: ...
    # Optional: ``opened(conn, engine)`` (migration by reopening) gets the switch applied on the batcher.


class Completions:
    """Answers, losses and time: the completion thread's whole job.

    Besides draining the rings it keeps time for the parts in flight: a part
    past its batch's deadline fails naming the server it waited for; with
    hedging on, a part older than its server's recent ``hedge_quantile`` gets
    one copy sent to another live replica (the first answer wins).  The
    doorbell wait is cut short to the next such moment.
    """

    def __init__(self, rings: list, doorbell, pending: PendingTable, finish: Callable[[Batch], None],
                 health: ServerHealth, submitter: Submitter, stats: FailoverCounters, request_timeout_s: float,
                 lookups: LookupEncoder, cache=None, on_migrated: MigrationListener | None = None,
                 hedging: bool = False, hedge_quantile: float = 0.95, hedge_min_s: float = 0.002,
                 beat: Callable[[], None] = lambda: None) -> None:
        self.rings = rings
        self.doorbell = doorbell
        self.pending = pending
        self.finish = finish
        self.health = health
        self.submitter = submitter
        self.counters = stats
        self.request_timeout_s = request_timeout_s
        self.lookups = lookups   # the batcher's: a copy is encoded exactly like the first send
        self.cache = cache
        self.on_migrated = on_migrated
        self.hedging = hedging
        self.hedge_quantile = hedge_quantile
        self.hedge_min_s = hedge_min_s
        self.beat = beat
        self.landing = LandingMaps()

    def run(self, stop) -> None:
        wait = 0.2
        while not stop.is_set():
            self.beat()
            self.doorbell.wait(wait)
            self.drain()
            wait = self.keep_time()

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
        self.landing.flush()   # sweep mappings of rings that are gone
        return n

    def handle(self, kind: int, data: memoryview) -> None:
        cid, arg = em.PREFIX.unpack_from(data, 0)
        if kind == em.COMP_FRAME:
            h = unpack_header(data[em.PREFIX_SIZE : em.PREFIX_SIZE + HEADER_SIZE])
            self._frame(h, data[em.PREFIX_SIZE + HEADER_SIZE : em.PREFIX_SIZE + HEADER_SIZE + h.payload_len])
        elif kind == em.COMP_REF:
            self._referenced(cid, data)
        elif kind == em.COMP_LOST:
            self.landing.forget(cid)
            self._lost(cid, bytes(data[em.PREFIX_SIZE :]).decode("utf-8", "replace"))
        elif kind == em.COMP_CONNECTED:
            self.health.conn_connected(cid)
        elif kind == em.COMP_MIGRATED:
            logger.info("connection %d now lives in engine %d", cid, arg)
            if self.on_migrated is not None:
                self.on_migrated.migrated(cid, arg)
        elif kind == em.COMP_OPENED:
            # Migration by reopening: the switch writes the old engine's ring, which is the
            # batcher's job (this thread must never wait for ring space): post it there.
            opened = getattr(self.on_migrated, "opened", None)
            if opened is not None:
                opened(cid, arg)
            else:
                self.submitter.opened(cid, arg)
        elif kind == em.COMP_OPEN_FAILED:
            reason = bytes(data[em.PREFIX_SIZE :]).decode("utf-8", "replace")
            logger.error("connection %d could not migrate to engine %d: %s", cid, arg, reason)
            self.submitter.open_failed(cid, arg)
            if self.on_migrated is not None:
                self.on_migrated.migrated(cid, self.submitter.owners.get(cid, arg))

    # ---------------------------------------------------------------- answers

    def _frame(self, h: Header, payload: memoryview) -> None:
        if h.type == FrameType.LOOKUP_RESP:
            self._answer(h.request_id, payload, h.aux)
        elif h.type == FrameType.FETCH_RESP:
            self._fill_done(h.request_id, payload, h.aux)
        elif h.type == FrameType.ERROR:
            if not self._fill_done(h.request_id, None):
                self._server_error(h.request_id, h.aux, codec.decode_error(payload))

    def _referenced(self, cid: int, data: memoryview) -> None:
        """COMP_REF: the frame's payload is where it landed; read it there, then give the space back."""
        off = em.PREFIX_SIZE + HEADER_SIZE
        h = unpack_header(data[em.PREFIX_SIZE : off])
        ino, seq, pos = em.REF.unpack_from(data, off)
        name = bytes(data[off + em.REF_SIZE :]).decode("ascii")
        payload = self.landing.view(cid, name, ino, seq, pos, h.payload_len)
        if payload is None:
            self._unreadable(cid, h.request_id, f"the answer of server {self.health.server_of_conn(cid)} is gone "
                                                f"from its response ring {name} (server restarted?)")
            return
        try:
            self._frame(h, payload)
        finally:
            self.landing.give_back(name, seq, pos + h.payload_len)
            try:
                payload.release()
            except BufferError:
                pass   # a view made from it still lives (nothing keeps one: accumulators copy)

    def _unreadable(self, cid: int, rid: int, reason: str) -> None:
        """An answer that cannot be read: its part is lost like one on a dead connection."""
        if self._fill_done(rid, None):
            return
        batch = self.pending.take_lookup(rid)
        if batch is None:
            return
        self.health.released(batch.parts[rid].server)
        if not batch.drop_copy(rid):
            self._reissue(batch, rid, reason)

    def _answer(self, rid: int, payload: memoryview, version: int = 0) -> None:
        batch = self.pending.take_lookup(rid)
        if batch is None:
            return   # a late copy, or the batch failed already
        part = batch.parts[rid]
        if version and batch.version and version != batch.version:
            # Never mix: a partial of another version fails the part instead of joining the batch.
            self.health.released(part.server)
            if not batch.drop_copy(rid) and batch.fail(
                    rid, f"embedding server {part.server} answered with model version {version}, the batch "
                         f"asked for {batch.version}", ErrorCode.INTERNAL):
                self.finish(batch)
            return
        accepted, done, moot = batch.complete(rid, payload)
        if accepted:
            self.health.answered(part.server, time.perf_counter() - part.sent_at)
            if part.hedge:
                self.counters.hedges_won += 1
            for sibling in moot:   # their answers, if they come, are ignored
                if self.pending.take_lookup(sibling) is not None:
                    self.health.released(batch.parts[sibling].server)
        else:
            self.health.released(part.server)
        if done:
            self.finish(batch)

    def _server_error(self, rid: int, code: int, message: str) -> None:
        batch = self.pending.take_lookup(rid)
        if batch is None:
            return
        part = batch.parts[rid]
        self.health.answered(part.server, time.perf_counter() - part.sent_at)
        if code == ErrorCode.UNKNOWN_VERSION and self._reissue_elsewhere(batch, rid, part):
            return   # a replica that restarted and does not hold the version yet: another one answers
        if batch.drop_copy(rid):
            return   # another copy of this part is still on its way
        if batch.fail(rid, f"embedding server {part.server}: {message}", code):
            self.finish(batch)

    # ---------------------------------------------------------------- losses and re-issues

    def _lost(self, conn: int, reason: str) -> None:
        server = self.health.conn_lost(conn, reason)
        lookups, fills = self.pending.on_connection(conn)
        for rid in lookups:
            batch = self.pending.take_lookup(rid)
            if batch is None:
                continue
            self.health.released(server)
            if batch.drop_copy(rid):
                continue
            self._reissue(batch, rid, reason)
        for rid in fills:
            self._fill_done(rid, None)

    def _reissue_elsewhere(self, batch: Batch, rid: int, part: Part) -> bool:
        """Send ``rid``'s part to another live replica than the one that refused it; False if none."""
        choice = self.health.choose(part.primary, exclude=(part.server,))
        if choice is None:
            return False
        if not self._send_copy(batch, part.copy_to(*choice)):
            return False
        self.counters.reissued += 1
        batch.drop_copy(rid)
        return True

    def _reissue(self, batch: Batch, rid: int, reason: str) -> None:
        """Send a lost part again to a live holder of its shards, or fail it naming the server."""
        part = batch.parts[rid]
        choice = self.health.choose(part.primary)
        if choice is not None and self._send_copy(batch, part.copy_to(*choice)):
            self.counters.reissued += 1
            return
        why = reason if choice is not None else f"{reason} ({self.health.describe_down(part.primary)})"
        if batch.fail(rid, why, ErrorCode.UNAVAILABLE):
            self.finish(batch)

    def _send_copy(self, batch: Batch, part: Part) -> bool:
        rid = self.pending.next_rid()
        if not batch.add_copy(rid, part):
            self.health.released(part.server)
            return True   # settled meanwhile: nothing to send
        self.pending.add_lookups(batch, [rid])
        # A copy asks for the batch's version (whatever the ranker serves by now) and the time left now.
        frame = self.lookups.encode(rid, batch, part)
        if self.submitter.submit(part.conn, frame, wait=False) is None:
            return True
        self.pending.take_lookup(rid)
        self.health.released(part.server)
        batch.drop_copy(rid)
        return False

    # ---------------------------------------------------------------- time: deadlines and hedges

    def keep_time(self) -> float:
        """Expire and hedge what is due; seconds until the next thing that will be due (≤ 0.2)."""
        now = time.perf_counter()
        next_due = now + 0.2
        for rid, batch in self.pending.lookups():
            part = batch.parts.get(rid)
            if part is None:
                continue
            if batch.deadline <= now:
                self._expire(rid, batch, part, now)
                continue
            next_due = min(next_due, batch.deadline)
            if batch.hedged(rid):
                continue
            if self.hedging:
                q = self.health.hedge_after_s(part.server, self.hedge_quantile)
                due = part.sent_at + max(self.hedge_min_s, q if q is not None else float("inf"))
            else:
                # Even without hedging, a part that waits far longer than its server ever takes
                # (a link cut without a reset: nothing tells us the connection is gone) goes to
                # another replica once, so replicas mean no failed request.
                due = part.sent_at + max(RESCUE_MIN_S, RESCUE_FACTOR * (self.health.median_s(part.server) or 0.0))
            if due <= now:
                self._hedge(batch, part, rescue=not self.hedging)
            else:
                next_due = min(next_due, due)
        return max(0.0005, next_due - now)

    def _expire(self, rid: int, batch: Batch, part: Part, now: float) -> None:
        if self.pending.take_lookup(rid) is None:
            return
        self.health.released(part.server)
        self.health.timed_out(part.server, now - part.sent_at)
        if batch.drop_copy(rid):
            return
        waited = (now - batch.works[0].arrived) * 1e3
        msg = (f"deadline of {batch.works[0].timeout_s * 1e3:.0f} ms passed waiting for embedding server "
               f"{part.server} ({waited:.0f} ms since the request arrived)")
        if batch.fail(rid, msg, ErrorCode.DEADLINE_EXCEEDED):
            self.finish(batch)

    def _hedge(self, batch: Batch, part: Part, rescue: bool = False) -> None:
        choice = self.health.choose(part.primary, exclude=(part.server,))
        if choice is None:
            return
        if self._send_copy(batch, part.copy_to(*choice, hedge=not rescue, spare=True)):
            if rescue:
                self.counters.reissued += 1
            else:
                self.counters.hedges_sent += 1

    # ---------------------------------------------------------------- cache fills

    def _fill_done(self, rid: int, payload: memoryview | None, version: int = 0) -> bool:
        """Completion of a cache fill (False if ``rid`` is not a fill)."""
        fill = self.pending.take_fill(rid)
        if fill is None:
            return False
        data = None
        if payload is not None:
            tid, data = codec.decode_fetch_response(payload)
            if tid != fill.table or (version and fill.version and version != fill.version):
                data = None
        if self.cache is not None:
            self.cache.filled(fill.table, fill.rows, data, fill.version)
        return True
