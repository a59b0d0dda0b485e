"""The one producer of an engine's completion ring.

The ring (lib/flexemr/ring) is single-producer: ``reserve``/``commit`` keep
the head and the pending reservation in plain attributes.  The receiver
thread is that producer: it lands every response frame straight in a slot.
Other threads that must report something (the sender: a connection migrated
away or a send failed; the handoff thread) never touch the ring: they
``post_*`` a message here, which queues it and wakes the receiver, and the
receiver writes the queue out between two frames::

    sender / handoff                         receiver (the producer)
    ----------------------------------       -------------------------------------------
    post_migrated(conn, to) ──▶ inbox ──┐    frame: reserve -> recv_into slot -> commit
                       wake() ──────────┼──▶ select() returns (wake pipe)
                                        └──▶ flush(): ring.write(...) each, in order

A large response on a connection that can lend (shm) is not copied at all:
the receiver reserves a small COMP_REF slot, the connection lends the
payload where it landed (``Connection.lend_payload``) and the slot names the
place.  ``bytes_copied``/``bytes_lent`` count payload bytes of each kind.

So a COMP_MIGRATED lands after every frame this engine received for that
connection, and no two threads ever reserve in the same ring.  Producer
methods check the calling thread: a second producer is a bug that should
fail loudly, not corrupt a slot.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from typing import Callable

from flexemr import enginemsg as em
from flexemr.ring import Ring
from flexemr.transport.base import Lent
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, ErrorCode, Header, pack_header_into

logger = logging.getLogger(__name__)

# A posted message waits at most this long for room per attempt; the receiver
# retries on its next pass instead of blocking its loop.
_POST_WRITE_TIMEOUT_S = 0.2
_MAX_RING_NAME = 200  # shm segment names are at most this long (naming._MAX_NAME)


class CompletionWriter:
    """Owns the producer end of one completion ring; see the module docstring."""

    def __init__(self, ring: Ring, wake: Callable[[], None]) -> None:
        self.ring = ring
        self._wake = wake
        self._inbox: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
        self._backlog: collections.deque[tuple[int, bytes]] = collections.deque()  # producer only
        self._producer: int | None = None
        self.bytes_copied = 0   # response payload bytes landed in ring slots (recv_into: a copy for shm/RDMA)
        self.bytes_lent = 0     # response payload bytes passed by reference (COMP_REF), never copied
        self.large_bytes_copied = 0   # of bytes_copied: in payloads of REF_MIN_PAYLOAD or more (could have been lent)

    @property
    def max_frame_payload(self) -> int:
        """Largest response payload that fits one completion message."""
        return self.ring.max_message - em.PREFIX_SIZE - HEADER_SIZE

    # ------------------------------------------------------------ any thread

    def post_migrated(self, cid: int, to_engine: int) -> None:
        """``cid`` now lives in ``to_engine`` (written after this engine's frames for it)."""
        self._post(em.COMP_MIGRATED, em.PREFIX.pack(cid, to_engine))

    def post_lost(self, cid: int, reason: str) -> None:
        """``cid`` failed: the inference fails what is in flight on it with ``reason``."""
        self._post(em.COMP_LOST, em.PREFIX.pack(cid, 0) + reason.encode())

    def post_connected(self, cid: int) -> None:
        """``cid`` is (re)connected and serving: the inference marks its server up."""
        self._post(em.COMP_CONNECTED, em.PREFIX.pack(cid, 0))

    def post_opened(self, cid: int, engine: int) -> None:
        """Migration by reopening: this engine's own connection for ``cid`` is ready for traffic."""
        self._post(em.COMP_OPENED, em.PREFIX.pack(cid, engine))

    def post_open_failed(self, cid: int, engine: int, reason: str) -> None:
        """Migration by reopening: this engine could not open ``cid``; it stays with its owner."""
        self._post(em.COMP_OPEN_FAILED, em.PREFIX.pack(cid, engine) + reason.encode())

    def pending(self) -> int:
        """Posted messages not yet written (approximate when read from another thread)."""
        return self._inbox.qsize() + len(self._backlog)

    def _post(self, kind: int, data: bytes) -> None:
        self._inbox.put((kind, data))
        self._wake()

    # ------------------------------------------------------------ producer thread only

    def bind_producer(self) -> None:
        """Make the calling thread the producer (the receiver calls this when it starts)."""
        self._producer = threading.get_ident()

    def _check_producer(self) -> None:
        me = threading.get_ident()
        if self._producer is None:
            self._producer = me
        elif me != self._producer:
            raise RuntimeError(f"completion ring {self.ring.name}: written from thread {threading.current_thread().name}"
                               f", but its single producer is another thread; post_*() a message instead")

    def flush(self) -> int:
        """Write posted messages in order until done or the ring has no room; returns how many were written."""
        self._check_producer()
        while True:
            try:
                self._backlog.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        written = 0
        while self._backlog:
            kind, data = self._backlog[0]
            if not self.ring.write(data, kind=kind, timeout=_POST_WRITE_TIMEOUT_S):
                break  # full: the inference is behind; try again on the next pass
            self._backlog.popleft()
            written += 1
        return written

    def reserve_frame(self, cid: int, header: Header, timeout: float) -> memoryview | None:
        """Reserve a slot for ``header``'s frame on ``cid``, fill in prefix and header, return the payload view.

        The caller ``recv_into``s the payload there, then :meth:`commit_frame`
        (or :meth:`cancel_frame`).  None if there was no room within ``timeout``.
        """
        self._check_producer()
        size = em.PREFIX_SIZE + HEADER_SIZE + header.payload_len
        slot = self.ring.reserve(size, timeout=timeout)
        if slot is None:
            return None
        em.PREFIX.pack_into(slot, 0, cid, 0)
        pack_header_into(slot, em.PREFIX_SIZE, header.type, header.request_id, header.payload_len, header.aux,
                         header.flags)
        return slot[em.PREFIX_SIZE + HEADER_SIZE:]

    def commit_frame(self) -> None:
        self._check_producer()
        self.ring.commit(kind=em.COMP_FRAME)

    def reserve_ref(self, cid: int, header: Header, timeout: float) -> memoryview | None:
        """Reserve a COMP_REF slot for ``header``'s frame on ``cid`` (prefix and header filled in).

        Returns the slot from the REF struct on; :meth:`commit_ref` fills it
        from the connection's ``Lent``, or :meth:`cancel_frame` if it lent nothing.
        """
        self._check_producer()
        slot = self.ring.reserve(em.PREFIX_SIZE + HEADER_SIZE + em.REF_SIZE + _MAX_RING_NAME, timeout=timeout)
        if slot is None:
            return None
        em.PREFIX.pack_into(slot, 0, cid, 0)
        pack_header_into(slot, em.PREFIX_SIZE, header.type, header.request_id, header.payload_len, header.aux,
                         header.flags)
        return slot[em.PREFIX_SIZE + HEADER_SIZE:]

    def commit_ref(self, view: memoryview, lent: Lent) -> None:
        self._check_producer()
        name = lent.ring.encode("ascii")
        em.REF.pack_into(view, 0, lent.ino, lent.seq, lent.pos)
        view[em.REF_SIZE:em.REF_SIZE + len(name)] = name
        self.ring.commit(em.PREFIX_SIZE + HEADER_SIZE + em.REF_SIZE + len(name), kind=em.COMP_REF)
        self.bytes_lent += lent.nbytes

    def cancel_frame(self) -> None:
        self._check_producer()
        self.ring.cancel()

    def write_error(self, cid: int, request_id: int, code: ErrorCode, message: str) -> None:
        """Answer ``request_id`` with an ERROR frame, as if the server had sent it."""
        self._check_producer()
        if not self.ring.write(em.PREFIX.pack(cid, 0), *codec.encode_error(request_id, code, message),
                               kind=em.COMP_FRAME, timeout=10):
            logger.error("completion ring full for 10 s: dropped the error for request %d (%s)", request_id, message)
