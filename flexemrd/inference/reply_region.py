"""The ranker's side of shared-memory replies: map a client's reply region, write answers into its slots.

A client passes a sealed memfd (``flexemr.client_shm``) over the unix socket;
``map_region`` checks it (a regular memfd, sealed against shrinking, the size
it claims, within the per-process ``RegionBudget``) and maps it.  Every
refusal raises ``RegionRefused`` with a message naming what is wrong, which
the session answers as an ERROR frame: the client falls back to frames and
the ranker keeps serving.

``MappedRegion.write`` (the finisher's thread) and ``close`` (the session's,
at disconnect) take one lock, so a mapping is never unmapped under a write;
an answer placed in a slot to be accumulated there (``place``) holds the
mapping through its array, so a close meanwhile leaves the unmapping to the
array's end.  The bytes go back to the budget on close.  The seal is what makes a write
safe against a hostile client: without it a client could truncate the memfd
and turn the ranker's next write into SIGBUS.

A region taken with requests (``requests``, flag REQUEST_SLOT;
flexemr.wire.requestslot) also carries the client's requests: ``read``
copies one request's span out into a private buffer, once, as it arrives, so
nothing the ranker validated can change under it afterwards (the client
writes into the same pages), and the region's seal keeps that read from
faulting too.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import threading
from typing import Sequence

import numpy as np

from flexemr.wire import replyslot
from flexemr.wire.replyslot import MIN_SLOT_BYTES

from flexemrd.inference.budget import ByteBudget


class RegionRefused(Exception):
    """A reply region the ranker will not map; the message says why (and names the limit)."""

    def __init__(self, message: str, overloaded: bool = False) -> None:
        super().__init__(message)
        self.overloaded = overloaded   # refused for the limit, not for the region itself


RegionBudget = ByteBudget   # bytes of client reply regions held, all sessions together


class MappedRegion:
    """A client's reply region mapped into this process (writable, shared)."""

    def __init__(self, mapping: mmap.mmap, nbytes: int, budget: RegionBudget, requests: bool = False) -> None:
        self.nbytes = nbytes
        self.requests = requests    # the client may send requests through it (the session agreed)
        self._mmap = mapping
        self._bytes: np.ndarray | None = np.frombuffer(mapping, np.uint8)
        self._budget = budget
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._bytes is None

    def write(self, offset: int, capacity: int, frame: Sequence) -> bool:
        """Copy the payload of the encoded answer ``frame`` into the slot ``[offset, offset + capacity)``
        (checked against the region when the request came); False when it does not fit or the region is
        gone (the caller sends the frame instead)."""
        n = replyslot.payload_bytes(frame)
        if n > capacity:
            return False
        with self._lock:
            if self._bytes is None:
                return False
            replyslot.write_payload(frame, self._bytes[offset : offset + n])
        return True

    def place(self, offset: int, nbytes: int) -> np.ndarray | None:
        """The slot bytes ``[offset, offset + nbytes)`` as a writable uint8 array, for an answer written in
        place over time (``SocketReplies.place_pooled``); None if the region is gone.  The array keeps the
        mapping alive: a ``close`` while it is being filled unmaps once it is garbage."""
        with self._lock:
            if self._bytes is None:
                return None
            return self._bytes[offset : offset + nbytes]

    def read(self, offset: int, nbytes: int) -> memoryview:
        """A private copy of the region's bytes ``[offset, offset + nbytes)`` (checked by the caller:
        ``requestslot.check_span``); ValueError if the region is closed."""
        out = np.empty(nbytes, np.uint8)
        with self._lock:
            if self._bytes is None:
                raise ValueError("the shared region is closed")
            out[:] = self._bytes[offset : offset + nbytes]
        return memoryview(out).cast("B")

    def close(self) -> None:
        """Unmap (once no write is running) and give the bytes back to the budget."""
        with self._lock:
            if self._bytes is None:
                return
            self._bytes = None
            try:
                self._mmap.close()
            except BufferError:
                pass   # a placed answer still points into it: unmapped when that array goes (never under it)
        self._budget.give(self.nbytes)


def map_region(fds: list[int], declared: int, budget: RegionBudget) -> MappedRegion:
    """Map the region a REPLY_REGION frame passed (``fds``: the descriptors that came with it; all are
    closed here, used or not).  Raises RegionRefused naming what is wrong."""
    try:
        if len(fds) != 1:
            raise RegionRefused(f"REPLY_REGION must carry exactly one file descriptor (SCM_RIGHTS), got {len(fds)}")
        fd = fds[0]
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise RegionRefused(f"reply region: cannot fstat the descriptor: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise RegionRefused("reply region: the descriptor is not a memfd (not a regular file)")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as e:
            raise RegionRefused(f"reply region: the descriptor is not a sealable memfd (F_GET_SEALS: {e.strerror})") \
                from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise RegionRefused("reply region: the memfd is not sealed against shrinking (F_SEAL_SHRINK), so the "
                                "ranker could fault writing it; seal it before sending")
        if st.st_size != declared:
            raise RegionRefused(f"reply region: the frame says {declared} bytes but the memfd has {st.st_size}")
        if declared < MIN_SLOT_BYTES:
            raise RegionRefused(f"reply region of {declared} bytes is too small (at least {MIN_SLOT_BYTES})")
        if not budget.take(declared):
            raise RegionRefused(f"a reply region of {declared} bytes would exceed the ranker's limit of "
                                f"{budget.limit} bytes of mapped reply regions ([ranker].max_reply_region_bytes; "
                                f"{budget.used} in use): answers come by frame", overloaded=True)
        try:
            mapping = mmap.mmap(fd, declared, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as e:
            budget.give(declared)
            raise RegionRefused(f"reply region: cannot map it read-write: {e}") from None
        return MappedRegion(mapping, declared, budget)
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
