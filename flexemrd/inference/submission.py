"""The submission side: the only writer of the engines' submission rings.

The rings are single-producer: the batcher submits each batch's parts, and
the completion thread may submit a hedge or a re-issue; both go through
``submit``, which serializes them with a lock (uncontended in the common
case) and never lets the completion thread wait for ring space.

It knows which engine owns each connection ("owned" mapping), or sends
through every engine in turn ("shared" mapping: the contention FlexEMR
removes, kept for comparison).  Migration changes the owner here first and
then tells the old engine with a SUB_MIGRATE marker after the last frame it
routed there for that connection.

A connection whose transport cannot move between processes (RDMA; or any,
with ``[ranker].migration = "reopen"``) migrates by reopening instead
(flexemrd/engine/reopen.py): ``migrate`` asks the new engine to open its own
(SUB_OPEN) and changes nothing yet; ``opened`` (COMP_OPENED) changes the owner
and tells the old engine with SUB_RETIRE after the last frame it routed
there, so until then the old connection serves everything and afterwards it
only receives its last answers.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

from flexemr import enginemsg as em

logger = logging.getLogger(__name__)


class Submitter:
    def __init__(self, rings: list, connections: dict[int, tuple[int, str]], owners: dict[int, int],
                 shared_mapping: bool = False, timeout_s: float = 30.0, reopen: frozenset[int] = frozenset()) -> None:
        self.rings = rings
        self.connections = connections
        self.owners = dict(owners)                  # conn -> engine: the batcher's view
        self.reopen = frozenset(reopen)             # connections that migrate by reopening
        self.opening: dict[int, int] = {}           # conn -> engine opening its own connection for it
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._engine_rr = itertools.cycle(range(len(rings))) if shared_mapping else None
        self.submitted: dict[int, int] = {c: 0 for c in connections}

    @property
    def shared(self) -> bool:
        return self._engine_rr is not None

    def _engine_for(self, conn: int) -> int:
        return self.owners[conn] if self._engine_rr is None else next(self._engine_rr)

    def submit(self, conn: int, frame: list, wait: bool = True) -> int | None:
        """Put ``frame`` on the ring of the engine owning ``conn``; the engine on failure, None when queued."""
        deadline = time.monotonic() + (self.timeout_s if wait else 0.0)
        while True:
            # Never hold the lock while waiting for ring space: the other caller may not wait.
            with self._lock:
                engine = self._engine_for(conn)
                if self.rings[engine].write(em.PREFIX.pack(conn, 0), *frame, kind=em.SUB_FRAME, timeout=0):
                    self.submitted[conn] += 1
                    return None
            if time.monotonic() >= deadline:
                return engine
            time.sleep(0.0005)

    def migrate(self, conn: int, to_engine: int) -> bool:
        """Route ``conn`` through ``to_engine`` from now on; False when it is already there."""
        if self._engine_rr is not None:
            raise ValueError("connections do not migrate under the \"shared\" mapping (every engine sends on all)")
        with self._lock:
            old = self.owners[conn]
            if conn in self.reopen:
                return self._reopen(conn, old, to_engine)
            if old == to_engine:
                return False
            self.owners[conn] = to_engine
            self.rings[old].write(em.PREFIX.pack(conn, to_engine), kind=em.SUB_MIGRATE, timeout=10)
        logger.info("migrating connection %d from engine %d to engine %d", conn, old, to_engine)
        return True

    def _reopen(self, conn: int, old: int, to_engine: int) -> bool:
        """Under the lock: ask ``to_engine`` to open its own connection for ``conn``."""
        opening = self.opening.get(conn)
        if opening is not None:
            if opening == to_engine:
                return True          # under way already
            if to_engine == old:
                # Moved back before the new connection was ready: forget it; when it reports
                # ready, opened() sees it was not asked for and retires it at once.
                del self.opening[conn]
                logger.info("connection %d stays on engine %d (engine %d's reopen is cancelled)", conn, old, opening)
                return False
            logger.warning("connection %d: engine %d is still opening it; moving it to engine %d waits for "
                           "that migration to finish", conn, opening, to_engine)
            return False
        if old == to_engine:
            return False
        self.opening[conn] = to_engine
        self.rings[to_engine].write(em.PREFIX.pack(conn, 0), kind=em.SUB_OPEN, timeout=10)
        logger.info("migrating connection %d from engine %d to engine %d by reopening it", conn, old, to_engine)
        return True

    def opened(self, conn: int, engine: int) -> None:
        """COMP_OPENED: route ``conn`` through ``engine`` from now on; the old engine drains and closes its own."""
        with self._lock:
            if self.opening.get(conn) != engine:
                # Not asked for (a stale answer): retire it again at once so nothing leaks.
                logger.warning("engine %d opened connection %d unasked; retiring it", engine, conn)
                target = self.owners[conn]
                if target == engine:
                    return
                self.rings[engine].write(em.PREFIX.pack(conn, target), kind=em.SUB_RETIRE, timeout=10)
                return
            del self.opening[conn]
            old = self.owners[conn]
            self.owners[conn] = engine
            # After the last frame routed to the old engine: it sends nothing on conn after this.
            self.rings[old].write(em.PREFIX.pack(conn, engine), kind=em.SUB_RETIRE, timeout=10)
        logger.info("connection %d now routed through engine %d; engine %d drains its own", conn, engine, old)

    def open_failed(self, conn: int, engine: int) -> None:
        """COMP_OPEN_FAILED: ``conn`` stays with its owner."""
        with self._lock:
            if self.opening.get(conn) == engine:
                del self.opening[conn]

