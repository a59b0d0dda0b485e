"""Lent ring ranges: a third process reads bytes where they landed, then gives them back.

A ring's consumer (the engine reading a shm response ring) may hand a byte
range of a message to a *borrower* (the ranker's completion thread) instead
of copying it out: ``Ring.lend`` records the lend in the ring's header page
and the consumer releases the message as usual.  The producer (the embedding
server) keeps off the range until the borrower returns it (the bound is drawn
in :mod:`flexemr.ring.layout`)::

    consumer (engine)                 ring header page              borrower (ranker)
    seq, pos = ring.lend(msg, o, n) ─▶ lent_end, lent_seq
    msg.release()                   ─▶ tail                 ref(seq, pos, n) via the completion ring ─▶
                                                                 view = b.view(seq, pos, n); use it
                                       returned_end/_seq  ◀───── b.give_back(seq, pos + n); b.flush()
    producer sleeping on "space"  ◀──────────── space doorbell, only if it waits (once per flush)

Returns must reach the ring in lend order (``returned_end`` is a prefix).  The
borrower usually sees lends in that order, but not always: a connection
handed to another engine lends through that engine's completion ring, which
the ranker may drain before the old one.  So ``give_back`` takes them in any
order and publishes only the contiguous prefix; a gap that stays open for
``GAP_TIMEOUT_S`` (a lend whose reference was lost with a restarted
process) is skipped with a log line by the caller, and a later reference to
a skipped lend gets no view (its bytes may have been reused).

Not thread-safe: one borrower thread per ring.
"""

from __future__ import annotations

import time

from flexemr.ring.layout import RETURN_WOKEN_SEQ, RETURNED_END, RETURNED_SEQ, SPACE_WAIT_SEQ, RingError
from flexemr.ring.ring import Ring

__all__ = ["Borrower", "GAP_TIMEOUT_S"]

GAP_TIMEOUT_S = 10.0


class Borrower:
    """The borrowing end of one ring's lends (see the module docstring)."""

    __slots__ = ("ring", "name", "ino", "_next", "_end", "_early", "_dirty", "_woken", "_gap_since")

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.name = ring.name
        self.ino = ring.ino
        ctr = ring._ctr
        self._next = int(ctr[RETURNED_SEQ])       # the oldest lend not returned yet
        self._end = int(ctr[RETURNED_END])
        self._early: dict[int, int] = {}          # seq -> end: returned ahead of an older lend
        self._dirty = False
        self._woken = int(ctr[RETURN_WOKEN_SEQ])
        self._gap_since: float | None = None

    @classmethod
    def attach(cls, name: str) -> Borrower:
        """Map ring ``name`` to borrow from it (FileNotFoundError when it is gone)."""
        # Pre-faulted (page tables only: the server's pages exist already), so
        # reading a partial never takes a page fault on the completion thread.
        return cls(Ring.attach(name, populate=True))

    def view(self, seq: int, pos: int, nbytes: int) -> memoryview | None:
        """The lent range, read-only in spirit; None if lend ``seq`` was already returned or skipped."""
        if seq < self._next or seq in self._early:
            return None
        cap = self.ring.capacity
        off = pos % cap
        if nbytes < 0 or off + nbytes > cap:
            raise RingError(f"ring {self.name}: lend {seq} of {nbytes} bytes at {pos} crosses the end of the ring")
        return self.ring._data[off:off + nbytes]

    def give_back(self, seq: int, end: int) -> None:
        """Lend ``seq`` (its range ended at stream position ``end``) is done with; published by :meth:`flush`."""
        if seq == self._next:
            self._next += 1
            self._end = end
            early = self._early
            while early:
                nxt = early.pop(self._next, None)
                if nxt is None:
                    break
                self._end = nxt
                self._next += 1
            self._gap_since = None if not early else time.monotonic()
            self._dirty = True
        elif seq > self._next:
            if not self._early:
                self._gap_since = time.monotonic()
            self._early[seq] = end

    def stale_gap(self, now: float, after_s: float = GAP_TIMEOUT_S) -> int:
        """If returns have waited on a missing lend for ``after_s``: skip the gap; returns lends skipped."""
        if not self._early or self._gap_since is None or now - self._gap_since < after_s:
            return 0
        first = min(self._early)
        skipped = first - self._next
        self._next = first
        self.give_back(first, self._early.pop(first))
        return skipped

    @property
    def waiting(self) -> int:
        """Lends returned out of order, held until the older ones come back."""
        return len(self._early)

    def flush(self) -> bool:
        """Publish the returns (one store pair) and wake a producer waiting for space; True if anything moved."""
        if not self._dirty:
            return False
        self._dirty = False
        ring = self.ring
        ctr = ring._ctr
        ctr[RETURNED_END] = self._end
        ctr[RETURNED_SEQ] = self._next
        # Mirror of Ring.reserve: store, fence, then look for a sleeper (ring.py docstring).
        ring._fence()
        seq = int(ctr[SPACE_WAIT_SEQ])
        if seq != self._woken:
            self._woken = seq
            ctr[RETURN_WOKEN_SEQ] = seq
            ring.space_doorbell.ring()
        return True

    def close(self) -> None:
        """Publish what was returned and unmap (the ring's names are its creator's to unlink)."""
        try:
            self.flush()
        finally:
            self.ring.close()

    def __repr__(self) -> str:
        return f"Borrower({self.name!r}, next={self._next}, waiting={len(self._early)})"
