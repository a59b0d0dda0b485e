"""The completion thread's view of the memory responses landed in (zero-copy responses).

A COMP_REF completion names a shm response ring, a lend in it and a range:
the engine did not copy the partial (flexemrd/engine/receiver.py).  This
module maps each such ring once (a ``flexemr.ring.Borrower``, keyed by name
and inode so a ring made again under an old name is never taken for the old
one), hands out the range as a memoryview, and gives each lend back as soon
as its partial is folded in (``give_back`` publishes at once: a partial is a
whole batch's share, up to megabytes, and a server waiting for space should
not wait for the rest of the drain; the producer is rung only if it sleeps).

Who unlinks what: the embedding server creates and unlinks its response
rings; a mapping here survives the unlink, so a partial being read never
vanishes under the reader when its server is killed.  Mappings are dropped
when their connection is lost (``forget``) and, every ``SWEEP_S``, when their
segment is gone (a connection retired by reopening, a server restarted), so a
dead ring's memory is not held for ever and nothing is left in /dev/shm.
"""

from __future__ import annotations

import logging
import os
import time

from flexemr import naming
from flexemr.ring import Borrower

logger = logging.getLogger(__name__)

SWEEP_S = 5.0


class LandingMaps:
    """Borrowers of the response rings COMP_REF messages point into; completion thread only."""

    def __init__(self) -> None:
        self._maps: dict[str, Borrower] = {}      # ring name -> its current mapping
        self._by_conn: dict[int, set[str]] = {}   # conn id -> ring names it lent from
        self._touched: set[str] = set()
        self._swept = time.monotonic()
        self.bytes_read = 0      # partial bytes read where they landed
        self.unavailable = 0     # references whose ring or lend was gone (their parts re-issued)
        self.skipped = 0         # lends skipped after a gap that never closed (GAP_TIMEOUT_S)

    def view(self, cid: int, name: str, ino: int, seq: int, pos: int, nbytes: int) -> memoryview | None:
        """The partial of lend ``seq`` in ring ``name``; None if that ring or lend is gone."""
        b = self._maps.get(name)
        if b is None or b.ino != ino:
            if b is not None:   # the name was made again: the old mapping is of a dead ring
                self._drop(name)
            try:
                b = Borrower.attach(name)
            except FileNotFoundError:
                self.unavailable += 1
                return None
            if b.ino != ino:
                b.close()
                self.unavailable += 1
                return None
            self._maps[name] = b
            self._by_conn.setdefault(cid, set()).add(name)
        v = b.view(seq, pos, nbytes)
        if v is None:
            self.unavailable += 1
        else:
            self.bytes_read += nbytes
        return v

    def give_back(self, name: str, seq: int, end: int) -> None:
        """The partial of lend ``seq`` is folded in: its space is the server's again (published now)."""
        b = self._maps.get(name)
        if b is not None:
            b.give_back(seq, end)
            b.flush()

    def flush(self) -> None:
        """End of a drain: publish gaps skipped by the sweep, and sweep every ``SWEEP_S``."""
        if self._touched:
            for name in self._touched:
                b = self._maps.get(name)
                if b is not None:
                    b.flush()
            self._touched.clear()
        now = time.monotonic()
        if now - self._swept >= SWEEP_S:
            self._swept = now
            self._sweep(now)

    def forget(self, cid: int) -> None:
        """Connection ``cid`` was lost: its rings will not be lent from again."""
        for name in self._by_conn.pop(cid, ()):
            self._drop(name)

    def close(self) -> None:
        for name in list(self._maps):
            self._drop(name)
        self._by_conn.clear()

    def __len__(self) -> int:
        return len(self._maps)

    def _sweep(self, now: float) -> None:
        for name, b in list(self._maps.items()):
            skipped = b.stale_gap(now)
            if skipped:
                self.skipped += skipped
                self._touched.add(name)
                logger.warning("ring %s: %d lent partials were never referenced (lost with a restarted process?);"
                               " their space is given back", name, skipped)
            if not os.path.exists(os.path.join(naming.SHM_DIR, name.lstrip("/"))):
                self._drop(name)

    def _drop(self, name: str) -> None:
        b = self._maps.pop(name, None)
        self._touched.discard(name)
        if b is not None:
            try:
                b.close()
            except Exception:   # never let a dead mapping stop the completion thread
                logger.exception("closing the mapping of ring %s", name)
        for names in self._by_conn.values():
            names.discard(name)
