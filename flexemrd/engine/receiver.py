"""The engine's receiver thread: polls its connections and lands every response in the completion ring.

For each readable connection it reads one frame header, reserves a
completion-ring slot of the exact size and ``recv_into``s the payload there
(no copy in Python), then commits and gives the server its credit back.
A payload of at least ``REF_MIN_PAYLOAD`` bytes on a connection that can
lend it (shm, or RDMA landing in a shm segment: rdma/landing.py) is not
copied at all: a small COMP_REF slot names where it lies, and the inference
process gives the space back once it has read it.  Over RDMA nothing wakes
this thread when the ranker gives space back, so while a connection has
lends out it asks it between selects (``poll_returns``: grants to the
server) and selects in short slices.
The credit is still returned here, at landing: credits bound the server's
work in flight, and the response ring bounds the bytes the ranker holds
(a ranker that stops consuming fills it and the server waits for space).
Between frames it applies connection changes other threads asked for
(watch a connection adopted by the hand-off thread; let go of one the sender
migrates away) and writes the messages they posted for the ring
(completions.py): it is the ring's only producer.

Other threads reach it through one wake pipe registered in its selector.
It calls ``heartbeat()`` at least every ``HEARTBEAT_S`` whatever the traffic
(the supervisor's liveness check).
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from typing import Callable

from flexemr import enginemsg as em
from flexemr.wire.frame import HEADER_SIZE, ErrorCode, FrameType, Header

from flexemrd.engine.completions import CompletionWriter
from flexemrd.engine.connections import ConnState, ConnTable
from flexemrd.engine.credits import CreditMode
from flexemrd.engine.reads import CacheReads

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.25
_SELECT_S = 0.2
_RESERVE_SLICE_S = 0.5
_STALL_WARN_S = 5.0   # a completion ring full this long: the inference is not consuming, say so
_RETURNS_SELECT_S = 0.01   # select slice while an RDMA landing has lends out (their returns wake nobody)
SUMMARY_EVERY_S = 5.0      # at most this often: one log line of payload bytes lent vs copied


class Wakeup:
    """A self-pipe: any thread ``wake()``s the receiver out of its ``select``."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def wake(self) -> None:
        try:
            os.write(self.w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the receiver is already due to wake

    def drain(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class Receiver:
    """Run ``run()`` on its own thread; ``watch``/``release`` may be called from any thread."""

    def __init__(self, table: ConnTable, completions: CompletionWriter, credits: CreditMode, wakeup: Wakeup,
                 stop: threading.Event, heartbeat: Callable[[], None] = lambda: None,
                 on_dead: Callable[[int, str], None] | None = None, reads: CacheReads | None = None) -> None:
        self.on_dead = on_dead or completions.post_lost   # who closes, fails fast and reconnects
        self.reads = reads   # cache fills by RDMA READ: their answers land here too (reads.py)
        self.table = table
        self.completions = completions
        self.credits = credits
        self.wakeup = wakeup
        self.stop = stop
        self.heartbeat = heartbeat
        self._sel = selectors.DefaultSelector()
        self._sel.register(wakeup.r, selectors.EVENT_READ, None)
        self._ops: list[tuple[str, int, threading.Event | None]] = []
        self._ops_lock = threading.Lock()
        self._watched: dict[int, ConnState] = {}  # receiver thread only: what it polls now
        self._last_beat = 0.0
        self._lending: set[int] = set()   # RDMA connections with lends out: poll their returns
        self._summary_at = 0.0
        self._summarised = (0, 0, 0)

    # ------------------------------------------------------------ any thread

    def watch(self, cid: int) -> None:
        """Start receiving on ``cid`` (already in the table)."""
        self._request("add", cid, None)

    def release(self, cid: int, timeout: float = 10.0) -> None:
        """Stop receiving on ``cid`` between two frames; returns once the receiver has let go."""
        done = threading.Event()
        self._request("remove", cid, done)
        if not done.wait(timeout):
            raise TimeoutError(f"receiver did not release connection {cid} within {timeout:g} s")

    def _request(self, op: str, cid: int, done: threading.Event | None) -> None:
        with self._ops_lock:
            self._ops.append((op, cid, done))
        self.wakeup.wake()

    # ------------------------------------------------------------ receiver thread

    def run(self) -> None:
        self.completions.bind_producer()
        try:
            while not self.stop.is_set():
                self._beat()
                if self._lending:
                    self._poll_returns()
                for key, _ in self._sel.select(timeout=_RETURNS_SELECT_S if self._lending else _SELECT_S):
                    if key.data is None:
                        self.wakeup.drain()
                        self._apply_ops()
                        continue
                    # Not self.table: a connection released by the ops just applied
                    # may still have an event in this batch, and its socket is
                    # already on its way to another engine.
                    st = self._watched.get(key.data)
                    if st is not None:
                        self._receive_one(st)
                self._apply_ops()
                self.completions.flush()
                self._summary()
        finally:
            self._release_all()
            self._sel.close()

    def _poll_returns(self) -> None:
        for cid in list(self._lending):
            st = self._watched.get(cid)
            try:
                still = st is not None and st.conn.poll_returns()
            except (ConnectionError, OSError):
                still = False   # the next read on it reports the loss
            if not still:
                self._lending.discard(cid)

    def _summary(self) -> None:
        c = self.completions
        state = (c.bytes_lent, c.bytes_copied, c.large_bytes_copied)
        now = time.monotonic()
        if state == self._summarised or now - self._summary_at < SUMMARY_EVERY_S:
            return
        self._summary_at, self._summarised = now, state
        logger.info("response payloads so far: %d bytes read in place (lent), %d bytes copied, of them %d in "
                    "responses of %d bytes or more", c.bytes_lent, c.bytes_copied, c.large_bytes_copied,
                    em.REF_MIN_PAYLOAD)

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self.heartbeat()

    def _apply_ops(self) -> None:
        with self._ops_lock:
            ops, self._ops = self._ops, []
        for op, cid, done in ops:
            if op == "add":
                st = self.table.get(cid)
                if st is not None and cid not in self._watched:
                    self._sel.register(st.conn.fileno(), selectors.EVENT_READ, cid)
                    self._watched[cid] = st
            elif op == "remove":
                st = self._watched.get(cid)
                if st is not None:
                    self._unwatch(st)
            if done is not None:
                done.set()

    def _release_all(self) -> None:
        """On exit: answer every pending release so no sender waits for a receiver that is gone."""
        with self._ops_lock:
            ops, self._ops = self._ops, []
        for _op, _cid, done in ops:
            if done is not None:
                done.set()

    def _unwatch(self, st: ConnState) -> None:
        self._watched.pop(st.conn_id, None)
        self._lending.discard(st.conn_id)
        try:
            self._sel.unregister(st.conn.fileno())
        except (KeyError, ValueError):
            pass

    def _receive_one(self, st: ConnState) -> None:
        conn = st.conn
        try:
            # A verbs connection's fd also wakes for its own send completions: read only
            # when bytes wait, or this thread would block here while others' answers wait.
            ready = conn.ready_to_read()
            if self.reads is not None:
                self.reads.land(st)   # fills whose READs completed: written as their FETCH_RESP would be
            if not ready:
                return
            h = conn.recv_header()
        except (ConnectionError, OSError) as e:
            self._dead(st, f"connection to server {conn.server} ({conn.address}) lost: {e}")
            return
        except Exception as e:  # ProtocolError: the stream is unusable
            self._dead(st, f"server {conn.server} sent a bad frame: {e}")
            return
        if h.payload_len > self.completions.max_frame_payload:
            # Cannot land in the ring: drain it and answer the batch with an error.
            conn.recv_payload(h)
            st.received += 1
            self.completions.write_error(
                conn.conn_id, h.request_id, ErrorCode.TOO_LARGE,
                f"a response of {h.payload_len} bytes from server {conn.server} does not fit the completion ring "
                f"(max {self.completions.max_frame_payload}); raise [ranker].ring_bytes or lower max_batch")
            return
        landed = self._land_by_ref(st, h) if h.payload_len >= em.REF_MIN_PAYLOAD else None
        if landed is False:
            return
        if landed is None:
            view = self._reserve(st, lambda t: self.completions.reserve_frame(conn.conn_id, h, timeout=t))
            if view is None:
                return
            try:
                conn.recv_payload_into(h, view)
            except (ConnectionError, OSError) as e:
                self.completions.cancel_frame()
                self._dead(st, f"connection to server {conn.server} lost mid-frame: {e}")
                return
            self.completions.commit_frame()
            self.completions.bytes_copied += h.payload_len
            if h.payload_len >= em.REF_MIN_PAYLOAD:
                self.completions.large_bytes_copied += h.payload_len
        self.credits.on_response(st)
        if h.type != FrameType.CREDIT:
            st.received += 1
            t0 = st.sent_at.pop(h.request_id, None)
            if t0 is not None:
                st.rtt.add(time.perf_counter_ns() - t0)
        st.bytes_received += em.PREFIX_SIZE + HEADER_SIZE + h.payload_len  # the answer as delivered, copied or lent

    def _land_by_ref(self, st: ConnState, h: Header) -> bool | None:
        """Pass ``h``'s payload by reference: True done, None the connection cannot lend it (copy it), False stop."""
        conn = st.conn
        ref = self._reserve(st, lambda t: self.completions.reserve_ref(conn.conn_id, h, timeout=t))
        if ref is None:
            return False
        try:
            lent = conn.lend_payload(h)   # RDMA: may wait for the payload's chunk, like recv_payload_into
        except (ConnectionError, OSError) as e:
            self.completions.cancel_frame()
            self._dead(st, f"connection to server {conn.server} lost mid-frame: {e}")
            return False
        if lent is None:
            self.completions.cancel_frame()
            return None
        self.completions.commit_ref(ref, lent)
        if hasattr(conn, "poll_returns"):   # RDMA: the returns reach the server only through our grants
            self._lending.add(conn.conn_id)
        return True

    def _reserve(self, st: ConnState, reserve: Callable[[float], memoryview | None]) -> memoryview | None:
        """A completion-ring slot, waiting (alive, and saying so after a while) while the ring is full; None: stop."""
        view = reserve(0)
        if view is not None:
            return view
        t0 = time.monotonic()
        warned = False
        while view is None:
            if self.stop.is_set():
                return None
            self._beat()  # alive, waiting for the inference to free space
            if not warned and time.monotonic() - t0 >= _STALL_WARN_S:
                warned = True
                logger.warning("completion ring %s full for %.0f s: the inference process is not consuming; "
                               "not reading server %d until it does", self.completions.ring.name, _STALL_WARN_S,
                               st.conn.server)
            view = reserve(_RESERVE_SLICE_S)
        if warned:
            logger.info("completion ring %s has room again after %.1f s", self.completions.ring.name,
                        time.monotonic() - t0)
        return view

    def _dead(self, st: ConnState, reason: str) -> None:
        self._unwatch(st)
        logger.error("%s", reason)
        self.on_dead(st.conn_id, reason)
