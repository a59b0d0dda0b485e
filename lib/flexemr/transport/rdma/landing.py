"""DATA PATH: where an RDMA data stream's incoming WRITEs land when the ranker reads them in place.

A ranker engine's data stream (stream.py) may receive into a *landing*: a
``flexemr.ring.Ring`` segment in /dev/shm that the engine creates and
registers as the QP's receive MR, so that the inference process can map it
by name (``flexemr.ring.Borrower``, flexemrd/inference/landing.py) and read a
large response where the embedding server's RDMA WRITE put it, exactly as it
reads a partial lent out of a shm response ring.  The ring's header page
carries the lend counters (layout.py); its data area is a *byte ring* of
chunks the server places itself, by the rule below, which both ends apply::

    stream position p (u64, only grows)        data area (capacity C, offset p % C)
    head ──▶ [ chunk n bytes ][pad to 64] ──▶ next head
    a chunk that would cross the end: skip to offset 0 (head += C - p % C)
    largest chunk: C / 2 (it always fits an empty ring, wherever head is)

The sender never sends WRITEs the receiver cannot place: each WRITE WITH IMM
carries its byte count (imm), RC keeps WRITEs in order, so the receiver
replays :func:`place` on its own head and knows where every chunk starts.
Flow control is by stream position: the sender may write a chunk only if its
end is at most ``limit`` = (the receiver's reclaim position) + C; the
receiver's reclaim is ``Ring.reclaim_tail()`` (its read position held back
by lends the ranker has not returned, layout.py) and it grants the increments
(stream.py).  Chunks start 64-byte aligned, so a float32 partial that starts a
chunk is aligned like one in a shm ring.

Lifetime (:class:`Landing`): created by the engine under
``/flexemr.<instance>.rx.eNN.pPID.*`` (naming.py), unlinked when its stream
closes and no lend is outstanding (a stream closed with lends out keeps its
segment until they come back or ``RETIRE_TIMEOUT_S`` passes: a reopened
connection's old answers stay readable); the first landing of an engine
process removes segments left by a dead one of the same engine (its pid is
gone), and the supervisor removes every name of the instance at stop.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import posix_ipc

from flexemr.naming import pid_alive
from flexemr import naming
from flexemr.ring import Ring
from flexemr.ring.layout import HEAD, LENT_BYTES, LENT_END, LENT_SEQ, RETURNED_SEQ, SLOT_ALIGN, TAIL

logger = logging.getLogger(__name__)

__all__ = ["Landing", "LANDING_BYTES", "MIN_LANDING_BYTES", "max_chunk", "place", "room", "sweep_stale",
           "RETIRE_TIMEOUT_S", "landing_bytes_for"]

LANDING_BYTES = 8 << 20       # the largest landing: answers up to 4 MiB land whole
MIN_DATA_LANDING = 2 << 20    # the smallest: an old server writes its 32 x 64 KiB slots into region 0
MIN_LANDING_BYTES = 64 << 10  # a sender refuses to place chunks in a smaller ring (v3 blob check)
RETIRE_TIMEOUT_S = 30.0       # lends a closed stream still waits for (a ranker that lost them)
_RETIRE_POLL_S = 0.5
_ALIGN_MASK = SLOT_ALIGN - 1


def landing_bytes_for(largest_response: int) -> int:
    """A landing in which a response of ``largest_response`` bytes lands whole (a chunk is half of it).

    Power of two between ``MIN_DATA_LANDING`` and ``LANDING_BYTES``: registering
    (pinning) it is part of every connection's set-up, and of every reopen.
    """
    want = 2 * (largest_response + 4096)
    cap = MIN_DATA_LANDING
    while cap < want and cap < LANDING_BYTES:
        cap *= 2
    return cap


def max_chunk(capacity: int) -> int:
    """The largest chunk a ring of ``capacity`` bytes takes: it fits an empty ring wherever its head is."""
    return capacity // 2


def place(head: int, nbytes: int, capacity: int) -> tuple[int, int]:
    """Where a chunk of ``nbytes`` written at stream position ``head`` lies: (start, next head).

    ``start`` is a stream position (the bytes are at ``start % capacity``,
    contiguous); the next head is 64-byte aligned.  Both ends call this.
    """
    if not 0 < nbytes <= max_chunk(capacity):
        raise ValueError(f"a chunk of {nbytes} bytes does not fit a landing of {capacity} (at most "
                         f"{max_chunk(capacity)})")
    off = head % capacity
    start = head + (capacity - off) if off + nbytes > capacity else head
    return start, (start + nbytes + _ALIGN_MASK) & ~_ALIGN_MASK


def room(head: int, limit: int, capacity: int) -> int:
    """The largest chunk that may be written at ``head`` now, given the grant ``limit`` (0: none)."""
    free = limit - head
    if free <= 0:
        return 0
    to_end = capacity - head % capacity
    best = min(to_end, free)           # in place, up to the end of the data area
    if free > to_end:                  # or wrapped to offset 0, after skipping the tail
        best = max(best, free - to_end)
    return min(best, max_chunk(capacity))


class Landing:
    """An engine data stream's receive ring in shared memory, with its lend counters (see module docstring).

    The engine's receiver is its only consumer and lender: ``land`` records
    where a chunk went (head), ``release_to`` how far reading got (tail),
    ``lend`` a payload range passed to the ranker; ``reclaim`` is where the
    sender's free space ends.
    """

    def __init__(self, name: str, capacity: int = LANDING_BYTES) -> None:
        self.ring = Ring.create(name, capacity)
        self.name = name
        self.ino = self.ring.ino
        self.capacity = capacity
        self._ctr = self.ring._ctr
        self._lent_seq = 0
        self._lent_bytes = 0
        self.closed = False

    @property
    def data(self) -> memoryview:
        """The data area (what the stream registers as its receive MR)."""
        return self.ring._data

    def land(self, head: int) -> None:
        self._ctr[HEAD] = head

    def release_to(self, pos: int) -> None:
        """Everything before stream position ``pos`` is read or lent (the lends hold their own bytes)."""
        self._ctr[TAIL] = pos

    def lend(self, pos: int, nbytes: int) -> int:
        """Lend ``[pos, pos + nbytes)`` to the ranker; returns the lend's number (before ``release_to`` past it)."""
        seq = self._lent_seq
        self._lent_seq = seq + 1
        self._lent_bytes += nbytes
        ctr = self._ctr
        ctr[LENT_END] = pos + nbytes     # before the tail moves past it (ring/layout.py)
        ctr[LENT_SEQ] = self._lent_seq
        ctr[LENT_BYTES] = self._lent_bytes
        return seq

    def reclaim(self) -> int:
        """Where the sender's free space ends: the read position, held back by lends not returned."""
        return self.ring.reclaim_tail()

    def outstanding(self) -> int:
        """Lends not returned yet."""
        return max(0, self._lent_seq - int(self._ctr[RETURNED_SEQ]))

    def close(self) -> None:
        """The stream is gone (nothing writes here any more): unlink now, or once the lends are back."""
        if self.closed:
            return
        self.closed = True
        if self.outstanding():
            _retire(self)
        else:
            self._destroy()

    def _destroy(self) -> None:
        try:
            self.ring.unlink()
        finally:
            self.ring.close()


# -- retired landings: a closed stream's segment waits for its lends -----------------------------
_RETIRED: list[tuple[Landing, float]] = []
_RETIRED_LOCK = threading.Lock()
_REAPER: threading.Thread | None = None


def _retire(landing: Landing) -> None:
    global _REAPER
    with _RETIRED_LOCK:
        _RETIRED.append((landing, time.monotonic() + RETIRE_TIMEOUT_S))
        if _REAPER is None or not _REAPER.is_alive():
            _REAPER = threading.Thread(target=_reap, name="landing-reaper", daemon=True)
            _REAPER.start()


def retired() -> int:
    """Closed landings still waiting for lends (tests, stats)."""
    with _RETIRED_LOCK:
        return len(_RETIRED)


def _reap() -> None:
    while True:
        time.sleep(_RETIRE_POLL_S)
        with _RETIRED_LOCK:
            keep = []
            for landing, deadline in _RETIRED:
                left = landing.outstanding()
                if left and time.monotonic() < deadline:
                    keep.append((landing, deadline))
                    continue
                if left:
                    logger.warning("landing %s: %d lent responses never came back in %.0f s; unlinking it",
                                   landing.name, left, RETIRE_TIMEOUT_S)
                try:
                    landing._destroy()
                except Exception:   # the reaper must outlive one bad segment
                    logger.exception("unlinking landing %s", landing.name)
            _RETIRED[:] = keep
            if not keep:
                global _REAPER
                _REAPER = None
                return


# -- names -------------------------------------------------------------------------------------
def landing_prefix(instance: str, engine_id: int) -> str:
    """``/flexemr.<instance>.rx.eNN``: the names of one engine's landings start with this."""
    return naming.shm_name(instance, "rx", naming.engine_tag(engine_id))


def sweep_stale(prefix: str) -> list[str]:
    """Unlink landings under ``prefix`` whose creating process is gone (a crashed engine); returns them."""
    head = prefix.lstrip("/") + ".p"
    removed = []
    try:
        entries = os.listdir(naming.SHM_DIR)
    except FileNotFoundError:
        return removed
    for entry in entries:
        is_sem = entry.startswith(naming.SEM_FILE_PREFIX)
        base = entry[len(naming.SEM_FILE_PREFIX):] if is_sem else entry
        if not base.startswith(head):
            continue
        pid = base[len(head):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        try:
            if is_sem:
                posix_ipc.unlink_semaphore("/" + base)
            else:
                posix_ipc.unlink_shared_memory("/" + base)
        except posix_ipc.ExistentialError:
            continue
        removed.append(entry)
    if removed:
        logger.info("removed %d landing names left by a dead engine process: %s", len(removed), ", ".join(removed))
    return removed
