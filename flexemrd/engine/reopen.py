"""Migration by reopening: for connections whose transport cannot move to another process (RDMA QPs).

A queue pair belongs to the process that created it, so instead of passing
the connection over (handoff.py) the two engines each play a part, driven by
the inference process (flexemrd/inference/submission.py)::

    inference                    new engine (Reopener)           old engine (Retirer)
    ---------                    ---------------------           --------------------
    SUB_OPEN(c) ───────────────▶ wait until no c drains here
                                 connect, HELLO, auth, credits
                                 (label "c.<engine>.<n>": booked
                                 apart on the server)
    route c to the new engine ◀─ COMP_OPENED(c, new)
    SUB_RETIRE(c, new) after the last frame routed to the old engine ──────▶ stop owning c; keep receiving
                                                                   until every answer sent on it is in,
                                                                   or DRAIN_TIMEOUT_S
    ack the migration ◀─────────────────────────────────────────── close it, COMP_MIGRATED(c, new)

No request fails and none goes to a closed connection: until COMP_OPENED the
old connection serves everything, after it the old one only receives.
Answers still missing at the drain deadline are not dropped: the old engine
reports the connection lost (COMP_LOST naming the server and the count), so
the inference re-issues those parts to a replica or fails them naming the
server, then reports it connected again (the new connection serves).  A
retiring connection that dies is reported the same way.

Separate threads, so a slow open (the new engine may first wait for its own
previous connection to ``c`` to finish draining) never delays a drain, and
the Reopener opens up to ``PARALLEL_OPENS`` connections at once: moves of
different connections overlap (a reopen costs seconds on the emulated guest,
docs/RDMA.md), while two requests for the same connection still run one
after the other.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from typing import Callable

from flexemr.errors import ProtocolError

from flexemrd.engine.completions import CompletionWriter
from flexemrd.engine.connections import ConnState, Connector, ConnTable
from flexemrd.engine.reconnect import backoff_s

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 10.0   # how long a retiring connection may take to receive its last answers
REOPEN_TIMEOUT_S = 30.0  # how long the new engine keeps trying to open its connection
_POLL_S = 0.002          # how often a drain checks for its last answer (only while one drains)
_RELEASE_S = 1.0         # the receiver lets go of an idle connection at once; longer means it is blocked in it
PARALLEL_OPENS = 4       # connections one engine opens at once for migrations (each its own thread)


def _close(st: ConnState) -> None:
    st.conn.close()
    if st.credit_conn is not None:
        st.credit_conn.close()


def _setup_breakdown(st: ConnState) -> str:
    """'' or ' (data: tcp 2.0, ->HELLO 40.2, ... ms; credit: ...)': where a reopen's time went."""
    parts = [f"{name}: {r}" for name, c in (("data", st.conn), ("credit", st.credit_conn))
             if c is not None and (r := c.setup_report())]
    return f" ({'; '.join(parts)})" if parts else ""


class Retirer:
    """The old engine's part: drain connections migrated away, then close them (``run`` on its own thread).

    ``release(cid, timeout)`` has the receiver let go of the connection
    between two frames (Receiver.release); ``cancel_reconnect(cid)`` stops
    reconnecting one that was down when it moved.  A receiver that does not
    let go at once is blocked reading it (an RDMA stream can wake its
    selector for a completion that is no frame, and no frame comes any more):
    the connection is interrupted (its read fails as if the peer had gone)
    and only closed once the receiver is out of it, since freeing a verbs
    stream under a reader crashes the process.
    """

    def __init__(self, engine_id: int, table: ConnTable, completions: CompletionWriter,
                 release: Callable[[int, float], None], cancel_reconnect: Callable[[int], bool], stop: threading.Event,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine_id = engine_id
        self.table = table
        self.completions = completions
        self.release = release
        self.cancel_reconnect = cancel_reconnect
        self.stop = stop
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self._lock = threading.Condition()
        self._draining: dict[int, tuple[float, int]] = {}   # cid -> (deadline, engine it moved to)
        self._closing: set[int] = set()                     # claimed by a finisher, not closed yet
        self._stuck: list[ConnState] = []                   # never let go by the receiver: closed at stop
        self.retired_total = 0
        self.leftovers_total = 0                            # answers still missing at a drain deadline

    # ------------------------------------------------------------ sender thread

    def retire(self, cid: int, to_engine: int) -> None:
        """SUB_RETIRE: nothing more is sent on ``cid`` here; drain it in the background."""
        st = self.table.retire(cid)
        if st is None:
            if self.table.down_reason(cid) is not None:
                # Down here: nothing to drain; the new engine's connection serves now.
                self.cancel_reconnect(cid)
                self.table.forget_down(cid)
                self.completions.post_connected(cid)
            else:
                logger.warning("retiring connection %d: engine %d does not own it", cid, self.engine_id)
            self.completions.post_migrated(cid, to_engine)
            return
        with self._lock:
            self._draining[cid] = (self.clock() + self.drain_timeout_s, to_engine)
            self._lock.notify_all()
        logger.info("connection %d (server %d) retiring: %d answers in flight, engine %d serves it now",
                    cid, st.conn.server, st.inflight, to_engine)

    # ------------------------------------------------------------ receiver thread

    def dead(self, cid: int, reason: str) -> bool:
        """The receiver lost ``cid``: True if it was retiring (then handled here, not reconnected)."""
        with self._lock:
            if cid in self._closing:
                return True          # a finisher is closing it anyway
            entry = self._draining.pop(cid, None)
            if entry is None:
                return False
            self._closing.add(cid)
        st = self.table.retiring.get(cid)
        try:
            if st is not None:
                _close(st)
                self._report_leftovers(cid, st, f"{reason} while it drained after moving to engine {entry[1]}")
            self.completions.post_migrated(cid, entry[1])
        finally:
            self._done(cid)
        return True

    # ------------------------------------------------------------ retirer thread

    def run(self) -> None:
        while not self.stop.is_set():
            with self._lock:
                if not self._draining:
                    self._lock.wait(0.2)
                    continue
            self.step()
            time.sleep(_POLL_S)

    def step(self) -> list[int]:
        """Close every retiring connection whose answers are all in or whose time is up; returns their ids."""
        now = self.clock()
        ready = []
        with self._lock:
            for cid, (deadline, to_engine) in list(self._draining.items()):
                st = self.table.retiring.get(cid)
                if st is None or st.inflight <= 0 or now >= deadline:
                    del self._draining[cid]
                    self._closing.add(cid)
                    ready.append((cid, st, to_engine))
        for cid, st, to_engine in ready:
            try:
                self._finish(cid, st, to_engine)
            finally:
                self._done(cid)
        return [cid for cid, _st, _to in ready]

    def draining(self) -> list[int]:
        with self._lock:
            return sorted(self._draining)

    def _finish(self, cid: int, st: ConnState | None, to_engine: int) -> None:
        if st is not None:
            if st.inflight > 0:
                # First: the receiver may be stuck, and these answers may never come.
                self._report_leftovers(cid, st, f"no answer within {self.drain_timeout_s:g} s of its move to "
                                                f"engine {to_engine}")
            if not self._let_go(cid, st):
                logger.error("connection %d (server %d): the receiver never let go of it; left open until the "
                             "engine stops rather than freed under a reader", cid, st.conn.server)
                self._stuck.append(st)
                self.completions.post_migrated(cid, to_engine)
                return
            _close(st)
            logger.info("connection %d (server %d) drained and closed; engine %d serves it",
                        cid, st.conn.server, to_engine)
        self.completions.post_migrated(cid, to_engine)

    def _let_go(self, cid: int, st: ConnState) -> bool:
        """Get the receiver off ``cid`` (the receiver reads no further frame on it); False if it never lets go."""
        try:
            self.release(cid, _RELEASE_S)
            return True
        except TimeoutError:
            pass
        for c in (st.conn, st.credit_conn):
            if c is not None:
                c.interrupt()
        try:
            self.release(cid, 10.0)
            return True
        except TimeoutError:
            return False

    def _report_leftovers(self, cid: int, st: ConnState, why: str) -> None:
        """Never lose answers silently: the inference re-issues (or fails, naming the server) what is left."""
        left = max(0, st.inflight)
        if not left:
            return
        self.leftovers_total += left
        reason = (f"connection {cid} to server {st.conn.server} ({st.conn.address}): {left} subrequest"
                  f"{'' if left == 1 else 's'} unanswered on the connection it replaced ({why})")
        logger.error("%s; re-issuing them", reason)
        self.completions.post_lost(cid, reason)
        self.completions.post_connected(cid)   # the new engine's connection serves it

    def _done(self, cid: int) -> None:
        self.table.retired(cid)          # only now may this engine open a new connection to cid
        with self._lock:
            self._closing.discard(cid)
            self.retired_total += 1

    def close_all(self) -> None:
        """Engine stopping: close whatever still drains."""
        for cid, st in self.table.retiring_items():
            _close(st)
            self.table.retired(cid)
        for st in self._stuck:
            _close(st)
        self._stuck.clear()


class Reopener:
    """The new engine's part: open its own connection for each SUB_OPEN (``run`` on its own thread)."""

    def __init__(self, engine_id: int, connector: Connector, directory: dict[int, tuple[int, str]],
                 table: ConnTable, own: Callable[[ConnState], None], completions: CompletionWriter,
                 stop: threading.Event, timeout_s: float = REOPEN_TIMEOUT_S,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, seed: int | None = None,
                 parallel: int = PARALLEL_OPENS) -> None:
        self.engine_id = engine_id
        self.connector = connector
        self.directory = directory
        self.table = table
        self.own = own
        self.completions = completions
        self.stop = stop
        self.timeout_s = timeout_s
        self.drain_timeout_s = drain_timeout_s
        self._rng = random.Random(seed)
        self._requests: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._labels = itertools.count(1)          # atomic under the GIL: each opener takes its own
        self.parallel = max(1, parallel)
        self._busy: set[int] = set()               # connections an opener thread is opening now
        self._busy_changed = threading.Condition()

    def request(self, cid: int) -> None:
        """SUB_OPEN (sender thread): open ``cid`` soon, never blocking the sender."""
        self._requests.put(cid)

    def run(self) -> None:
        """Serve SUB_OPEN requests on this thread and ``parallel - 1`` more until ``stop``."""
        helpers = [threading.Thread(target=self._serve, name=f"reopen-{k}", daemon=True)
                   for k in range(1, self.parallel)]
        for t in helpers:
            t.start()
        self._serve()
        for t in helpers:
            t.join(5.0)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                cid = self._requests.get(timeout=0.2)
            except queue.Empty:
                continue
            # One opener per connection: a second request for it waits for the first
            # (then finds it here), so two threads never open the same connection.
            with self._busy_changed:
                while cid in self._busy and not self.stop.is_set():
                    self._busy_changed.wait(0.2)
                if self.stop.is_set():
                    return
                self._busy.add(cid)
            try:
                self.open(cid)
            finally:
                with self._busy_changed:
                    self._busy.discard(cid)
                    self._busy_changed.notify_all()

    def open(self, cid: int) -> bool:
        """Open this engine's connection for ``cid`` and report it (COMP_OPENED or COMP_OPEN_FAILED)."""
        server, address = self.directory[cid]
        if self.table.get(cid) is not None:
            self.completions.post_opened(cid, self.engine_id)   # already here: nothing to open
            return True
        # Our previous connection to cid may still be draining: the receiver and the
        # server's books know one connection per cid per engine, so wait for it.
        if not self.table.wait_not_retiring(cid, self.stop, self.drain_timeout_s + 5.0):
            return self._failed(cid, f"engine {self.engine_id}'s previous connection {cid} to server {server} "
                                     f"({address}) is still draining")
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            attempt += 1
            label = f"{cid}.{self.engine_id}.{next(self._labels)}"
            t0 = time.monotonic()
            try:
                st = self.connector.open(cid, server, address, label=label)
                break
            except (OSError, ProtocolError) as e:
                if self.stop.is_set() or time.monotonic() + backoff_s(attempt + 1, self._rng) > deadline:
                    return self._failed(cid, f"engine {self.engine_id} could not open connection {cid} to server "
                                             f"{server} ({address}) after {attempt} attempts: {e}")
                logger.warning("opening connection %d to server %d (%s) for a migration, attempt %d: %s",
                               cid, server, address, attempt, e)
                time.sleep(backoff_s(attempt, self._rng))
        took_ms = (time.monotonic() - t0) * 1e3
        self.own(st)
        logger.info("connection %d to server %d (%s) opened here as %s in %.1f ms, for a migration%s",
                    cid, server, address, label, took_ms, _setup_breakdown(st))
        self.completions.post_opened(cid, self.engine_id)
        return True

    def _failed(self, cid: int, reason: str) -> bool:
        logger.error("%s; the connection stays with its owner", reason)
        self.completions.post_open_failed(cid, self.engine_id, reason)
        return False
