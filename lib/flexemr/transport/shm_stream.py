"""DATA PATH: a byte stream over one SPSC shared-memory ring, with a unix socket as its doorbell.

The shm transport (shm.py) carries each direction of a connection in one
:class:`flexemr.ring.Ring`.  The ring holds *chunks* of a byte stream: a
blocking sender writes a whole frame as one chunk (gathered buffers copied
once into the ring), a non-blocking sender as much as fits now.  After each
chunk is committed the writer sends ONE byte on the connection's unix socket;
that byte is the doorbell, so the peer's selector can watch the socket, and
EOF on it is how either end learns that the other died.

The reader keeps this invariant, which level-triggered selectors rely on::

    the socket is readable  <=>  a committed chunk is not fully read yet (or the peer is gone)

so it takes a chunk only when its byte is there (``MSG_PEEK`` counts them) and
drains the byte only once the chunk is fully read (``recv(n)``, batched per
call).  A reader that stops in the middle of a chunk (a full buffer, a server
that pauses reading) leaves the socket readable, exactly like unread bytes in
a TCP socket; a spurious wake-up (a byte for a chunk already read) cannot
happen, so a blocking ``recv_header`` after ``select`` never waits for
nothing.

Costs per chunk: one ``send`` of one byte (writer), one peek and one ``recv``
shared by all chunks read in a call (reader); no semaphore on the data path.
A full ring is waited on with the ring's "space" doorbell in short slices,
checking the socket for a hung-up peer between them.

Several producers: under the "shared" mapping every engine sends on every
connection, one at a time under the connection's cross-process lock, each
through its own mapping of the ring.  The Ring caches its producer counters,
so :meth:`RingWriter` reloads them from shared memory before each write
(four loads; nothing else changes for a single producer).

Zero copy: :meth:`RingReader.lend` hands a frame's payload to the ranker
where it lies in the ring (flexemr.ring.lend) instead of copying it out; the
writer's free space then stops at the oldest lend not returned yet
(``Ring.reclaim_tail``), so lent bytes are never overwritten.

Migration: :func:`write_resume_offset` writes how far into the oldest held
chunk the reader got into the ring's header page (offset ``RESUME_OFFSET``, a
word the ring layout leaves zero in the consumer's cache line) so that the
engine adopting the connection resumes mid-chunk instead of reading a frame
twice.
"""

from __future__ import annotations

import mmap
import select
import socket
import struct
from typing import Sequence

import posix_ipc

from flexemr.copying import copy_bytes
from flexemr.ring import Message, Ring
from flexemr.ring.layout import BYTES_WRITTEN, HEAD, MSG_HEADER_BYTES, MSGS_WRITTEN, SLOT_ALIGN, SPACE_WAIT_SEQ

__all__ = ["RingReader", "RingWriter", "RESUME_OFFSET", "read_resume_offset", "write_resume_offset"]

RESUME_OFFSET = 352          # byte offset in the ring header page: reserved (zero) in ring layout v1
_RESUME = struct.Struct("<Q")
_PEEK_MAX = 1 << 16          # doorbell bytes counted per peek
_SLOT_MASK = ~(SLOT_ALIGN - 1)
_HUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)
SPACE_SLICE_S = 0.2          # a blocked writer checks for a dead peer this often
NOWAIT_SPACE_S = 0.002       # how long send_nowait may wait for ring space (see RingWriter.write_nowait)
MIN_PARTIAL = 64 << 10       # a non-blocking write never splits into chunks smaller than this


def _peer_gone(sock: socket.socket) -> bool:
    p = select.poll()
    p.register(sock.fileno(), _HUP)
    return any(ev & _HUP for _fd, ev in p.poll(0))


class RingWriter:
    """The producing end: chunks into ``ring``, one doorbell byte each on ``sock``."""

    def __init__(self, ring: Ring, sock: socket.socket, peer: str) -> None:
        self.ring = ring
        self.sock = sock
        self.peer = peer

    def _sync(self) -> None:
        """Start from the shared producer counters: another process may have produced since (shared mapping)."""
        ring = self.ring
        ctr = ring._ctr   # the ring's own uint64 view of its header page
        ring._head = int(ctr[HEAD])
        ring._msgs_w = int(ctr[MSGS_WRITTEN])
        ring._bytes_w = int(ctr[BYTES_WRITTEN])
        ring._wait_seq = int(ctr[SPACE_WAIT_SEQ])

    def write_all(self, buffers: Sequence) -> int:
        """Copy ``buffers`` into the ring as whole chunks (one per frame when it fits), blocking while full."""
        self._sync()
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(v.nbytes for v in views)
        if total == 0:
            return 0
        ring = self.ring
        vi, voff, left = 0, 0, total
        while left:
            n = min(left, ring.max_message)
            slot = ring.reserve(n, timeout=SPACE_SLICE_S)
            while slot is None:
                if _peer_gone(self.sock):
                    raise ConnectionError(f"{self.peer} is gone (shm ring full and its socket hung up)")
                slot = ring.reserve(n, timeout=SPACE_SLICE_S)
            vi, voff = _gather(slot, views, vi, voff)
            self._publish()
            left -= n
        return total

    def write_nowait(self, views: Sequence[memoryview]) -> int:
        """Copy as much of ``views`` as fits now (at least ``MIN_PARTIAL`` or all); returns bytes written.

        When the ring is full this waits up to ``NOWAIT_SPACE_S`` for room:
        the socket stays writable while the ring is full, so an event loop
        watching EVENT_WRITE would otherwise spin on a core it shares.
        """
        ring = self.ring
        self._sync()
        total = 0
        for v in views:
            total += len(v)
            if total >= ring.max_message:
                break
        want = min(total, ring.max_message)
        if want == 0:
            return 0
        slot = ring.try_reserve(want)
        if slot is None:
            fit = self._largest_fit()
            floor = min(want, MIN_PARTIAL)
            if fit >= floor:
                slot = ring.try_reserve(min(want, fit))
            if slot is None:
                slot = ring.reserve(floor, timeout=NOWAIT_SPACE_S)
                if slot is None:
                    if _peer_gone(self.sock):
                        raise ConnectionError(f"{self.peer} is gone (its socket hung up)")
                    return 0
        n = len(slot)
        _gather(slot, [memoryview(v).cast("B") for v in views], 0, 0)
        self._publish()
        return n

    def _largest_fit(self) -> int:
        """The largest payload a slot could take right now (no wait), 0 if none."""
        ring = self.ring
        cap = ring.capacity
        head = int(ring._ctr[HEAD])
        free = cap - (head - ring.reclaim_tail())   # lent ranges are not free (ring/lend.py)
        to_end = cap - head % cap
        in_place = (min(to_end, free) & _SLOT_MASK) - MSG_HEADER_BYTES
        wrapped = ((free - to_end) & _SLOT_MASK) - MSG_HEADER_BYTES if free > to_end else 0
        return max(0, in_place, wrapped)

    def _publish(self) -> None:
        self.ring.commit(notify=False)   # the socket byte below is the doorbell
        try:
            self.sock.send(b"\x01")
        except OSError as e:
            raise ConnectionError(f"{self.peer} is gone ({e})") from None


def _gather(slot: memoryview, views: list[memoryview], vi: int, voff: int) -> tuple[int, int]:
    """Fill ``slot`` from ``views`` starting at view ``vi``, byte ``voff``; returns where it stopped."""
    off, n = 0, len(slot)
    while off < n:
        v = views[vi]
        k = min(len(v) - voff, n - off)
        copy_bytes(slot[off:off + k], v[voff:voff + k])
        off += k
        voff += k
        if voff == len(v):
            vi, voff = vi + 1, 0
    return vi, voff


class RingReader:
    """The consuming end (see the module docstring for the socket invariant)."""

    def __init__(self, ring: Ring, sock: socket.socket, peer: str, resume: int = 0) -> None:
        self.ring = ring
        self.sock = sock
        self.peer = peer
        self._cur: Message | None = None
        self._off = 0
        self._resume = resume      # bytes of the first chunk a previous owner already read
        self._avail = 0            # doorbell bytes seen for chunks not taken yet
        self._owed = 0             # doorbell bytes of fully read chunks, still in the socket
        self._eof = False
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN | _HUP)

    def read_into(self, view: memoryview, block: bool) -> int:
        """Copy up to ``len(view)`` stream bytes into ``view``; with ``block``, exactly that many.

        Non-blocking: returns 0 when nothing is there; ConnectionError when
        nothing is there and the peer is gone.
        """
        want = len(view)
        got = 0
        try:
            while got < want:
                cur = self._cur if self._cur is not None else self._take()
                if cur is None:
                    if self._eof:
                        if got and not block:
                            break
                        raise ConnectionError(f"{self.peer} closed the shm connection")
                    if not block:
                        break
                    self._poll.poll()
                    continue
                data, off = cur.data, self._off
                k = min(len(data) - off, want - got)
                copy_bytes(view[got:got + k], data[off:off + k])
                got += k
                self._off = off + k
                if self._off == len(data):
                    self._finish()
        finally:
            self._drain()
        return got

    def lend(self, nbytes: int) -> tuple[int, int] | None:
        """Take the next ``nbytes`` of the stream without copying them: lend them out of the ring.

        Possible only when they are all in the chunk at hand (or the next one,
        if its doorbell byte is there): returns (lend seq, stream position) and
        moves past them, as ``read_into`` would.  None when they are not (a
        frame split across chunks, or not arrived yet): nothing was consumed,
        read them with ``read_into``.
        """
        try:
            cur = self._cur if self._cur is not None else self._take()
            if cur is None or cur.nbytes - self._off < nbytes:
                return None
            lent = self.ring.lend(cur, self._off, nbytes)
            self._off += nbytes
            if self._off == cur.nbytes:
                self._finish()
            return lent
        finally:
            self._drain()

    def _take(self) -> Message | None:
        """The next chunk whose doorbell byte has arrived, or None (``_eof`` set when the peer is gone)."""
        if not self._avail:
            self._drain()
            try:
                self._avail = len(self.sock.recv(_PEEK_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                self._eof = True
                return None
            if not self._avail:
                self._eof = True
                return None
        msg = self.ring.peek()
        if msg is None:   # cannot happen: the writer commits before it rings
            return None
        self._avail -= 1
        self._cur, self._off = msg, 0
        if self._resume:
            self._off, self._resume = min(self._resume, msg.nbytes), 0
            if self._off == msg.nbytes:
                self._finish()
                return self._take()
        return msg

    def _finish(self) -> None:
        cur, self._cur = self._cur, None
        if cur is not None:
            cur.release()
            self._owed += 1

    def _drain(self) -> None:
        while self._owed:
            try:
                n = len(self.sock.recv(self._owed, socket.MSG_DONTWAIT))
            except (BlockingIOError, InterruptedError):
                return   # cannot happen: these bytes were counted by a peek
            except OSError:
                return
            if n == 0:
                return
            self._owed -= n

    @property
    def offset_in_chunk(self) -> int:
        """How far into the oldest unreleased chunk this connection's reading got (0 between chunks).

        Before the first chunk is taken that is still the previous owner's
        offset: a connection migrated on before it read anything must pass it on.
        """
        return self._off if self._cur is not None else self._resume

    def let_go(self) -> int:
        """Stop reading (migration): drop the held chunk without releasing it; returns the offset into it."""
        self._drain()
        off = self.offset_in_chunk
        if self._cur is not None:
            self._cur.data.release()
            self._cur = None
        return off


def write_resume_offset(ring_name: str, offset: int) -> None:
    """Record in ``ring_name``'s header page how far into its oldest chunk the consumer got."""
    _with_header(ring_name, lambda mm: _RESUME.pack_into(mm, RESUME_OFFSET, offset))


def read_resume_offset(ring_name: str) -> int:
    """The offset :func:`write_resume_offset` recorded, and reset it to 0."""
    out = [0]

    def take(mm: mmap.mmap) -> None:
        out[0] = _RESUME.unpack_from(mm, RESUME_OFFSET)[0]
        _RESUME.pack_into(mm, RESUME_OFFSET, 0)

    _with_header(ring_name, take)
    return out[0]


def _with_header(ring_name: str, fn) -> None:
    try:
        shm = posix_ipc.SharedMemory(ring_name)
    except posix_ipc.ExistentialError:
        raise FileNotFoundError(f"ring {ring_name!r} does not exist (did its server close the connection?)") from None
    try:
        mm = mmap.mmap(shm.fd, mmap.PAGESIZE)
    finally:
        shm.close_fd()
    try:
        fn(mm)
    finally:
        mm.close()

