"""DATA PATH: a daemon ``Connection``'s frames over one RC queue pair, TCP kept as the control channel.

The ``rdma`` transport (flexemr.transport.verbs) gives each Connection a
``FrameStream``: its own RC QP, its own CQ and completion channel (so the
owner's selector can watch this connection alone), and two registered rings
of ``slots`` x ``slot_bytes``::

    this side                                        the peer
    tx ring (registered)  --RDMA WRITE WITH IMM-->   rx ring slot k (registered, remote write)
      frame bytes copied in    imm = bytes in slot     k advances with every WRITE (RC keeps order)
    rx ring slot j        <--RDMA WRITE WITH IMM--   its tx ring
    credits               <--SEND 0 bytes, imm = n-- "n more rx slots are free" (after n slots read)

Both directions use WRITE WITH IMM into the other side's receive ring (the
issue allows requests to go as a WRITE into a server-side registered ring
instead of a SEND); the receive WRs it consumes are immediate-only (the
endpoint's scratch buffer), so nothing but a counter tells a slot apart.  A
frame larger than a slot spans several; the receiver reads the ring as a byte
stream.  Flow control is by slots: the sender spends one credit per WRITE
and the receiver grants them back once it has read them (every
``slots // 4``), so a WRITE never meets a full ring and the RNR path is
never needed.

Landing in place (blob version 3, landing.py): an engine's data stream
made with ``landing=NAME`` receives into a shm ``Ring`` segment the ranker
can map, and offers it (``accepts`` = 3, region 0 = the whole segment).  A
server that reads version 3 answers with a v3 blob and then *places* its
WRITEs there as a byte ring (``landing.place``: chunks of whole send views,
never wrapped) within the bytes the engine granted (a SEND whose imm has bit
31 set: ``BYTE_GRANT | bytes``, from ``Landing.reclaim()``: the read position
held back by lends not returned), so ``lend`` can pass a response payload to
the ranker where it landed (a COMP_REF) instead of copying it out.  Slot
credits still bound the WRITEs in flight (receive WRs).  Against an old peer
(no v3 on either side) both ends keep the slots and the copy below.

What is still a copy (docs/RDMA.md): the sender copies frame bytes into its
tx ring (one memcpy, numpy) and the receiver copies what it does not lend
out of its rx ring into the caller's view (the engine's completion-ring
slot for small frames, the server's request buffer).

Waiting: completions are polled in batches; a blocking call that finds
nothing arms the CQ and sleeps in ``select()`` on the channel fd (never
spins).  ``fileno()`` is an epoll fd that is readable when the channel has an
event, bytes are buffered (an eventfd this class sets), or the TCP control
socket says the peer is gone, so a selector loop (the embedding server, the
engine's receiver) treats it like a socket.

Thread use: one sender thread and one receiver thread at once (the engine),
or one event loop (the server); a lock covers the CQ and the counters.  The
fd also wakes for this side's own send completions, which bring nothing to
read: a loop that then reads blocking asks ``readable()`` first (the
engine's receiver), else it sits in this stream while others' bytes wait.
``close()`` may come from another thread while one waits here: the waiter
raises ``ConnectionError`` and never touches the destroyed verbs objects.
Failures: an error completion, a refused post or the TCP control socket
closing raise ``ConnectionError`` (``QueuePairError`` is one) naming the
peer; the owner closes the connection and connects a fresh one.

Cache fills by RDMA READ (flexemrd/engine/reads.py) share the data QP: a
data stream's send queue has ``READ_WRS`` more entries for them, so reads
in flight never take a frame's place.  ``post_reads`` posts a chain of READs
tagged with the caller's number, ``take_reads`` hands back how many of each
tag completed; completed reads make ``fileno()`` readable like bytes do
(the eventfd), whichever thread polled them, so the receiver that lands the
fill wakes.  A READ that fails is an error completion like any other: the
stream raises ``QueuePairError`` and the connection is lost.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from flexemr.transport.rdma.blob import FLAG_FRAME_STREAM, VERSION, ConnectionBlob, ReadTable, RemoteRegion
from flexemr.transport.rdma.channel import CREDIT_SL, CREDIT_TRAFFIC_CLASS, DATA_SL, DATA_TRAFFIC_CLASS
from flexemr.transport.rdma.endpoint import POLL_BATCH, Endpoint, Region, RegistrationError
from flexemr.transport.rdma.errors import BlobError
from flexemr.transport.rdma.landing import LANDING_BYTES, Landing, max_chunk, place, room
from flexemr.transport.rdma.qp import QueuePair

logger = logging.getLogger(__name__)

__all__ = ["FrameStream", "DATA_SLOTS", "DATA_SLOT_BYTES", "CREDIT_SLOTS", "CREDIT_SLOT_BYTES", "READ_WRS"]

DATA_SLOTS = 32
DATA_SLOT_BYTES = 64 << 10
CREDIT_SLOTS = 8          # the credit channel's frames are tiny
CREDIT_SLOT_BYTES = 4 << 10
_SPARE_RECVS = 16         # receives beyond the slots: credit grants consume them too
_LEN_MASK = (1 << 24) - 1
_WR_DATA, _WR_GRANT, _WR_READ = 1, 2, 3   # low 2 bits of wr_id; a READ's tag is wr_id >> 2
READ_WRS = 64             # RDMA READs a data stream keeps in flight at most (extra send-queue entries)
_WAIT_SLICE_S = 0.5       # a blocking wait re-checks the control socket this often
BYTE_GRANT = 1 << 31      # a grant's imm with this bit: the landing's reclaim moved by (imm & ~BYTE_GRANT) bytes
MAX_LANDING_BYTES = 32 << 20   # a chunk's length must fit the imm's 24 bits
_SPLIT_MIN = 64 << 10     # a view larger than a chunk is split into pieces no smaller than this
_HEADER_VIEW = 64         # a view this small ending a chunk is taken for a frame header (see _pump_placed)
_RETURNS_WAIT_S = 0.02    # a wait while the landing has lends out re-reads the ranker's returns this often
_BYTE_GRANT_GAP_S = 0.005  # small landing grants go at most this often (each takes a peer receive)


class _NoOwner:
    """QueuePair wants an owner for the endpoint's shared CQ; this stream polls its own CQ."""

    def handle(self, wc: Any) -> object | None:
        return None

    def replenish(self) -> None:
        return None


class FrameStream:
    """One connection's bytes over verbs (see the module docstring)."""

    def __init__(self, endpoint: Endpoint, peer: str, control: socket.socket, *, priority: bool = False,
                 landing: str | None = None, landing_bytes: int = LANDING_BYTES, peer_landing: int = 0) -> None:
        """``landing`` (engine data streams): receive into a shm ring of that name, offered to the peer;
        ``peer_landing`` (server): the peer offered a landing of that many bytes, place our WRITEs in it."""
        self.ep = endpoint
        self.peer = peer
        self.control = control
        self.priority = priority
        self.slots = CREDIT_SLOTS if priority else DATA_SLOTS
        self.slot_bytes = CREDIT_SLOT_BYTES if priority else DATA_SLOT_BYTES
        pv = self._pv = endpoint.pv
        e = pv.enums
        self._op_recv_imm = e.IBV_WC_RECV_RDMA_WITH_IMM
        self._op_recv = e.IBV_WC_RECV
        self._op_write = e.IBV_WC_RDMA_WRITE
        # Incoming messages in flight: at most ``slots`` WRITEs plus grants, each
        # returning at least one slot; receives and send WRs are sized for both.
        nwr = 2 * self.slots + _SPARE_RECVS
        self.read_wrs = 0 if priority else READ_WRS
        depth = 2 * nwr + self.read_wrs + 8
        # What setting up this stream cost, step by step (ms): a migration's log line shows it.
        self.setup_ms: dict[str, float] = {}
        t = time.monotonic()
        self.cq, self.channel, self._chan_fd = endpoint.completion_queue(depth)
        os.set_blocking(self._chan_fd, False)  # two threads may race for one event: the loser must not block
        t = self._took("cq", t)
        sl, tc = (CREDIT_SL, CREDIT_TRAFFIC_CLASS) if priority else (DATA_SL, DATA_TRAFFIC_CLASS)
        self.qp = QueuePair(endpoint, peer, _NoOwner(), sl=sl, traffic_class=tc, max_send_wr=nwr + self.read_wrs,
                            max_recv_wr=nwr, role="credit" if priority else "data", cq=self.cq)
        t = self._took("qp", t)
        ring = self.slots * self.slot_bytes
        self.landing: Landing | None = None
        rx = None
        if landing is not None and not priority:
            self.landing, rx = self._make_landing(landing, landing_bytes)
        self.rx = rx if rx is not None else endpoint.register(np.zeros(ring, np.uint8), remote_write=True)
        self._peer_landing = peer_landing if not priority else 0
        self.tx = endpoint.register(np.zeros(self._peer_landing or ring, np.uint8))
        t = self._took("mr", t)
        self._rx_view = memoryview(self.rx.array)
        self._tx_array = self.tx.array
        self.remote: RemoteRegion | None = None
        self.peer_blob: ConnectionBlob | None = None   # what the peer sent (its tables, for cache-fill READs)
        self._reads_inflight = 0
        self._reads_done: collections.Counter[int] = collections.Counter()   # tag -> READs completed
        self._lock = threading.Condition()
        self._armed = False
        self._poller = False          # a thread is asleep in select() on the channel fd
        self._tx_credits = 0          # peer rx slots we may still write
        self._tx_remote = 0           # the peer's rx slot our next WRITE lands in
        self._tx_local = 0            # our tx slot the next WRITE is copied into
        self._tx_busy = 0             # tx slots whose WRITE has not completed
        self._backlog: collections.deque[bytes] = collections.deque()   # accepted by send_nowait, not posted
        self._rx_next = 0             # our rx slot the next incoming WRITE fills
        self._rx: collections.deque[list[int]] = collections.deque()    # [start, end) byte ranges to read
        self._rx_owed = 0             # slots read but not granted back yet
        self._reposts = 0             # receive WRs consumed, to post again
        self._grant_every = max(1, self.slots // 4)
        self.failed: BaseException | None = None
        self.bytes_written = 0        # payload bytes this side sent over verbs
        self.bytes_received = 0
        self.bytes_lent = 0           # received bytes passed on where they landed (lend), never copied
        # Placing our WRITEs in the peer's landing (server; landing.py), decided by connect().
        self._place = False
        self._tx_head = 0             # stream position of our next chunk in the peer's landing
        self._tx_limit = 0            # a chunk may end at most here (the peer's grants)
        self._tx_starts: collections.deque[int] = collections.deque()   # chunks posted, not completed
        self._max_chunk = 0
        # Receiving into our landing as a byte ring (engine), decided by connect().
        self._rx_bytes = False
        self._rx_cap = len(self.rx.array)
        self._rx_head = 0             # where the next incoming chunk starts (replayed place())
        self._granted = 0             # reclaim position the peer has been told
        self._grant_bytes_every = self._rx_cap // 8
        self._byte_granted_at = 0.0
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._efd_set = False
        # Wakes the thread asleep on the channel fd when another thread consumed the
        # channel's event and handled the completion that thread was waiting for.
        self._kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        for fd in (self._chan_fd, self._efd, control.fileno()):
            self._epoll.register(fd, select.EPOLLIN)
        self.closed = False

    # -- set-up -------------------------------------------------------------------
    def _took(self, step: str, since: float) -> float:
        now = time.monotonic()
        self.setup_ms[step] = (now - since) * 1e3
        return now

    def blob(self, tables: tuple[ReadTable, ...] = (), boot_version: int = 0) -> bytes:
        """This side's connection blob (travels in the HELLO).

        Version 1 (readable by any peer, ``accepts`` = 2) unless the peer
        already said it reads version 2 (a server answering a new ranker):
        then version 2 with ``tables``, the rows the peer may READ.
        """
        dev = self.ep.device
        v2 = self.peer_blob is not None and self.peer_blob.peer_reads >= 2
        version = 3 if self._place else 2 if v2 else 1
        # Offering version 3 means "place your WRITEs in my landing": only with a landing.
        accepts = VERSION if self.landing is not None else 2
        return ConnectionBlob(self.qp.qpn, self.qp.psn, self.qp.qpn, self.qp.psn, dev.gid, dev.mtu,
                              self.slots, self.slot_bytes, FLAG_FRAME_STREAM, (self.rx.remote(),),
                              version=version, accepts=accepts, tables=tables if v2 else (),
                              boot_version=boot_version if v2 else 0).pack()

    def _make_landing(self, name: str, capacity: int) -> tuple[Landing | None, Region | None]:
        """The shm landing and its registration, or (None, None), logged: the copying path then."""
        if capacity < self.slots * self.slot_bytes:   # an old server writes its slots there
            raise ValueError(f"a landing of {capacity} bytes cannot hold {self.slots} slots of {self.slot_bytes}")
        try:
            landing = Landing(name, capacity)
        except (OSError, ValueError) as e:
            logger.warning("RDMA to %s: no shared landing (%s); responses are copied out of a private ring",
                           self.peer, e)
            return None, None
        try:
            return landing, self.ep.register(landing.data, remote_write=True)
        except RegistrationError as e:
            landing.close()
            logger.warning("RDMA to %s: cannot register the shared landing %s (%s); responses are copied",
                           self.peer, name, e)
            return None, None

    @property
    def lands_in_place(self) -> bool:
        """Receiving into the shared landing as a byte ring (the peer places its WRITEs): ``lend`` works."""
        return self._rx_bytes

    def connect(self, blob: ConnectionBlob) -> None:
        """RTR/RTS towards the peer's QP and post the receives; writes may arrive from now on."""
        if not blob.flags & FLAG_FRAME_STREAM or len(blob.regions) != 1:
            raise BlobError(f"connection blob from {self.peer} is not a frame stream's (flags 0x{blob.flags:x}, "
                            f"{len(blob.regions)} regions)")
        if blob.regions[0].length < blob.recv_slots * blob.recv_slot_bytes or blob.recv_slots == 0:
            raise BlobError(f"connection blob from {self.peer}: its ring of {blob.regions[0].length} bytes cannot "
                            f"hold {blob.recv_slots} slots of {blob.recv_slot_bytes}")
        if self._peer_landing and blob.regions[0].length != self._peer_landing:
            raise BlobError(f"connection blob from {self.peer}: its landing is {blob.regions[0].length} bytes, "
                            f"not the {self._peer_landing} it was sized for")
        if blob.version >= 3 and self.landing is None:
            raise BlobError(f"connection blob from {self.peer}: version 3 (it places its writes in our landing), "
                            "but this side offered none")
        self.peer_blob = blob
        self._peer_slots = blob.recv_slots
        self._peer_slot_bytes = blob.recv_slot_bytes
        self._place = self._peer_landing > 0
        if self._place:
            self._tx_limit = self._peer_landing
            self._max_chunk = max_chunk(self._peer_landing)
        self._rx_bytes = blob.version >= 3
        t = time.monotonic()
        self.qp.connect(blob.qpn, blob.psn, blob.gid, blob.mtu)
        self._chunk = min(self.slot_bytes, blob.recv_slot_bytes)
        self._post_receives(2 * self.slots + _SPARE_RECVS)
        self._took("rts", t)
        with self._lock:
            self.remote = blob.regions[0]
            self._tx_credits = blob.recv_slots
            self._settle()

    def fileno(self) -> int:
        return self._epoll.fileno()

    def readable(self) -> bool:
        """Non-blocking: True when bytes wait, so a read will not block on this connection.

        ``fileno()`` also wakes for this side's own send completions (frames,
        slot grants), which carry nothing to read: a selector loop that reads
        blocking (the engine's receiver) asks this first, or it would sit in
        one connection's read while another's answer waits.  Raises
        ``ConnectionError`` when the peer is gone.
        """
        with self._lock:
            self._check_open()
            self._consume_event()
            self._progress()
            if not self._rx:
                self._check_control()
            self._settle()
            return bool(self._rx)

    # -- blocking (engines) ----------------------------------------------------------
    def send(self, buffers: Sequence) -> int:
        """Send every byte of ``buffers`` in order, waiting for credits as needed; returns the count."""
        total = 0
        with self._lock:
            self._check_open()
            if self._place:
                for b in buffers:
                    mv = memoryview(b).cast("B")
                    if len(mv):
                        self._backlog.append(mv)
                        total += len(mv)
                # Every byte is in our tx ring before we return: the caller may reuse its buffers.
                self._wait(lambda: not self._backlog, "landing space")
                self._settle()
                return total
            for b in buffers:
                mv = memoryview(b).cast("B")
                off = 0
                while off < len(mv):
                    self._pump()
                    if self._backlog or not self._can_write():
                        self._wait(lambda: not self._backlog and self._can_write(), "send credits")
                        continue
                    n = min(len(mv) - off, self._chunk)
                    self._write(mv[off:off + n])
                    off += n
                total += len(mv)
            self._settle()
        return total

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly, waiting as needed."""
        view = view.cast("B") if view.format != "B" else view
        got = 0
        with self._lock:
            self._check_open()
            while got < len(view):
                got += self._read(view[got:])
                if got < len(view):
                    self._wait(lambda: bool(self._rx), "data")
            self._settle()

    def lend(self, nbytes: int) -> tuple[Landing, int, int] | None:
        """Take the next ``nbytes`` without copying them: (landing, lend seq, stream position), or None.

        Only when receiving into the landing and the bytes lie in one chunk
        (the server sends each view whole); waits, like ``recv_into``, for
        the chunk to arrive.  None: nothing was consumed, read them instead.
        The ranker reads them where they are and returns them (Borrower);
        until then the peer's grants stop short of them.
        """
        landing = self.landing
        if not self._rx_bytes or landing is None or nbytes <= 0:
            return None
        with self._lock:
            self._check_open()
            if not self._rx:
                self._wait(lambda: bool(self._rx), "data")
            r = self._rx[0]
            if r[1] - r[0] < nbytes:
                self._settle()
                return None
            pos = r[0]
            seq = landing.lend(pos, nbytes)
            r[0] += nbytes
            if r[0] == r[1]:
                self._rx.popleft()
                self._rx_owed += 1
                landing.release_to(r[2])
            self.bytes_received += nbytes
            self.bytes_lent += nbytes
            self._grant(force=False)
            self._settle()
            return landing, seq, pos

    def poll_returns(self) -> bool:
        """Grant the peer what the ranker gave back since; True while lends are still out (poll again soon).

        The ranker's returns wake nobody on this side, and a server waiting
        for landing space sends nothing that would: the engine's receiver
        calls this between selects (flexemrd/engine/receiver.py).
        """
        landing = self.landing
        if not self._rx_bytes or landing is None:
            return False
        with self._lock:
            if self.closed:
                return False
            self._grant(force=True, paced=True)
            return self._returns_pending()

    def _returns_pending(self) -> bool:
        """Lends still out, or space given back that the peer has not been granted yet."""
        landing = self.landing
        return landing is not None and (landing.outstanding() > 0 or landing.reclaim() > self._granted)

    # -- non-blocking (the server's event loop) ------------------------------------------
    def recv_nowait(self, view: memoryview) -> int:
        with self._lock:
            self._check_open()
            self._consume_event()
            self._progress()
            n = self._read(view)
            if n == 0:
                self._check_control()
            self._settle()
            return n

    def send_nowait(self, views: Sequence[memoryview]) -> int:
        """Take every byte now: what does not fit the peer's ring waits here (copied), in order."""
        total = 0
        with self._lock:
            self._check_open()
            self._consume_event()
            self._progress()
            self._pump()
            if self._place:
                added = 0
                for v in views:
                    mv = memoryview(v).cast("B")
                    if len(mv):
                        self._backlog.append(mv)
                        added += 1
                        total += len(mv)
                self._pump()
                # What is left of the caller's views waits here: copy it, they may be reused once we return.
                q = self._backlog
                for i in range(max(0, len(q) - added), len(q)):
                    if isinstance(q[i], memoryview):
                        q[i] = bytes(q[i])
                self._settle()
                return total
            for v in views:
                mv = memoryview(v).cast("B")
                off = 0
                while off < len(mv) and not self._backlog and self._can_write():
                    n = min(len(mv) - off, self._chunk)
                    self._write(mv[off:off + n])
                    off += n
                if off < len(mv):
                    # The caller may reuse its buffers once we return: keep a copy.
                    self._backlog.append(bytes(mv[off:]))
                total += len(mv)
            self._settle()
        return total

    # -- cache-fill READs (flexemrd/engine/reads.py) ---------------------------------------
    def post_reads(self, local: Region, offsets: np.ndarray, nbytes: np.ndarray, remote: RemoteRegion,
                   remote_offsets: np.ndarray, tag: int) -> int:
        """Post READs of ``remote`` into ``local`` (one doorbell), as many as fit; returns how many were posted.

        At most ``READ_WRS`` are in flight; the caller posts the rest after
        ``take_reads`` reported some done.  Non-blocking.
        """
        with self._lock:
            self._check_open()
            room = min(self.read_wrs - self._reads_inflight, len(offsets), self.qp.send_free - 2)
            n = 0
            if room > 0:
                wr_id = (tag << 2) | _WR_READ
                n = self.qp.post_reads(local, offsets[:room], nbytes[:room], remote, remote_offsets[:room],
                                       [wr_id] * room)
                self._reads_inflight += n
            self._settle()
            return n

    def take_reads(self) -> dict[int, int]:
        """Tag -> READs completed since the last call (non-blocking; raises ConnectionError if the QP failed)."""
        with self._lock:
            self._check_open()
            self._consume_event()
            self._progress()
            done, self._reads_done = dict(self._reads_done), collections.Counter()
            self._settle()
            return done

    def backlogged(self) -> bool:
        """Bytes ``send_nowait`` took that still wait for the peer's slot grants (the owner must keep
        watching ``fileno()``: the grants wake it, and its next call pushes them)."""
        return bool(self._backlog)

    # -- internals (lock held) -------------------------------------------------------------
    def _check_open(self) -> None:
        # Another thread may close us (the engine's receiver, on a lost peer) while this
        # one waits: its verbs objects are gone, so it must not touch them again.
        if self.closed:
            raise ConnectionError(f"connection to {self.peer} was closed")

    def _can_write(self) -> bool:
        return self._tx_credits > 0 and self._tx_busy < self.slots and self.qp.send_free > 1

    def _write(self, mv: memoryview) -> None:
        n = len(mv)
        remote = self.remote
        assert remote is not None
        off = self._tx_local * self.slot_bytes
        self._tx_array[off:off + n] = np.frombuffer(mv, np.uint8)
        ok = self.qp.post_write_imm(self.tx, off, n, remote, self._tx_remote * self._peer_slot_bytes,
                                    imm=n, wr_id=_WR_DATA)
        assert ok, "send queue checked by _can_write"
        self._tx_credits -= 1
        self._tx_busy += 1
        self._tx_local = (self._tx_local + 1) % self.slots
        self._tx_remote = (self._tx_remote + 1) % self._peer_slots
        self.bytes_written += n

    def _pump(self) -> None:
        """Post backlog bytes as credits allow."""
        if self._place:
            self._pump_placed()
            return
        while self._backlog and self._can_write():
            head = self._backlog[0]
            n = min(len(head), self._chunk)
            self._write(memoryview(head)[:n])
            if n == len(head):
                self._backlog.popleft()
            else:
                self._backlog[0] = head[n:]

    def _pump_placed(self) -> None:
        """Post backlog views into the peer's landing (landing.py), as its grants allow.

        A chunk gathers whole views; a view is never split unless it is larger
        than a chunk, so a response payload (its own view) lands in one piece
        that the engine can lend.  A view that does not fit yet waits.
        """
        q = self._backlog
        cap = self._peer_landing
        while q and self._tx_credits > 0 and self._tx_busy < self.slots and self.qp.send_free > 1:
            limit = self._tx_limit
            if self._tx_starts:   # our own tx ring: a chunk's bytes stay until its WRITE completed
                limit = min(limit, self._tx_starts[0] + cap)
            fit = room(self._tx_head, limit, cap)
            first = len(q[0])
            if first > fit:
                if first <= self._max_chunk or fit < min(self._max_chunk, _SPLIT_MIN):
                    return
                head = memoryview(q[0])
                self._write_placed([head[:fit]], fit)
                q[0] = head[fit:]
                continue
            parts = []
            total = 0
            for v in q:
                if total + len(v) > fit:
                    break
                parts.append(v)
                total += len(v)
            if len(parts) < len(q) and len(parts[-1]) <= _HEADER_VIEW and \
                    len(parts[-1]) + len(q[len(parts)]) <= self._max_chunk:
                # A frame header whose payload does not fit now waits to go with it: else the engine
                # would read the header and wait inside the stream for a payload held back by space.
                if len(parts) == 1:
                    return
                total -= len(parts.pop())
            self._write_placed(parts, total)
            for _ in parts:
                q.popleft()

    def _write_placed(self, parts: list, total: int) -> None:
        remote = self.remote
        assert remote is not None
        cap = self._peer_landing
        start, nxt = place(self._tx_head, total, cap)
        off = start % cap
        at = off
        tx = self._tx_array
        for v in parts:
            n = len(v)
            tx[at:at + n] = np.frombuffer(v, np.uint8)
            at += n
        ok = self.qp.post_write_imm(self.tx, off, total, remote, off, imm=total, wr_id=_WR_DATA)
        assert ok, "send queue checked by _pump_placed"
        self._tx_credits -= 1
        self._tx_busy += 1
        self._tx_starts.append(start)
        self._tx_head = nxt
        self.bytes_written += total

    def _read(self, view: memoryview) -> int:
        got = 0
        rx = self._rx
        cap = self._rx_cap
        while rx and got < len(view):
            r = rx[0]
            k = min(r[1] - r[0], len(view) - got)
            o = r[0] % cap
            view[got:got + k] = self._rx_view[o:o + k]
            r[0] += k
            got += k
            if r[0] == r[1]:
                rx.popleft()
                self._rx_owed += 1
                if self._rx_bytes:
                    self.landing.release_to(r[2])   # type: ignore[union-attr]
        if got:
            self.bytes_received += got
            self._grant(force=False)
        return got

    def _grant(self, force: bool, paced: bool = False) -> None:
        if self._rx_owed and (force or self._rx_owed >= self._grant_every) and self.qp.send_free > 0:
            self.qp.post_send(self.ep.scratch, 0, 0, wr_id=_WR_GRANT, imm=self._rx_owed)
            self._rx_owed = 0
        if self._rx_bytes:
            # Landing space: what was read, up to the oldest lend the ranker still holds (three
            # loads, once per call: the returns are read per batch, never per row).  reclaim()
            # may dip below a position already granted (a new lend after a gap, layout.py):
            # only its advances are granted.
            # ``paced`` (the receiver's polling of returns): small grants at most every
            # _BYTE_GRANT_GAP_S, since each SEND takes one of the peer's posted receives and
            # returns arriving one by one must not flood them; the poller comes back for the rest.
            delta = self.landing.reclaim() - self._granted   # type: ignore[union-attr]
            if delta > 0 and self.qp.send_free > 0 and (delta >= self._grant_bytes_every or force and (
                    not paced or time.monotonic() - self._byte_granted_at >= _BYTE_GRANT_GAP_S)):
                self.qp.post_send(self.ep.scratch, 0, 0, wr_id=_WR_GRANT, imm=BYTE_GRANT | delta)
                self._granted += delta
                self._byte_granted_at = time.monotonic()

    def _progress(self) -> int:
        """Poll the CQ dry (in batches); returns the completions handled."""
        handled = 0
        while True:
            n, wcs = self.cq.poll(POLL_BATCH)
            if not n:
                break
            for wc in wcs:
                if wc.status != 0:
                    self.qp.check(wc)  # raises QueuePairError naming the peer
                op = wc.opcode
                if op == self._op_recv_imm:
                    nbytes = int(wc.imm_data) & _LEN_MASK
                    if self._rx_bytes:   # the peer placed it by the shared rule (landing.py)
                        start, nxt = place(self._rx_head, nbytes, self._rx_cap)
                        self._rx.append([start, start + nbytes, nxt])
                        self._rx_head = nxt
                        self.landing.land(nxt)   # type: ignore[union-attr]
                    else:
                        start = self._rx_next * self.slot_bytes
                        self._rx.append([start, start + nbytes])
                        self._rx_next = (self._rx_next + 1) % self.slots
                    self._reposts += 1
                elif op == self._op_recv:
                    imm = int(wc.imm_data)
                    if imm & BYTE_GRANT:
                        self._tx_limit += imm & ~BYTE_GRANT
                    else:
                        self._tx_credits += imm
                    self._reposts += 1
                else:
                    self.qp.send_done()
                    wr_id = int(wc.wr_id)
                    if wr_id == _WR_DATA:
                        self._tx_busy -= 1
                        if self._tx_starts:
                            self._tx_starts.popleft()
                    elif wr_id & 3 == _WR_READ:
                        self._reads_inflight -= 1
                        self._reads_done[wr_id >> 2] += 1
            handled += n
            if n < POLL_BATCH:
                break
        if self._reposts:
            self._post_receives(self._reposts)
            self._reposts = 0
        if handled:
            self._lock.notify_all()
            if (self._rx or self._reads_done) and not self._efd_set:
                # Bytes landed while another thread held the channel's event (a sender
                # waiting for credits): the owner's selector must still see them.
                os.eventfd_write(self._efd, 1)
                self._efd_set = True
            if self._poller:
                os.eventfd_write(self._kick, 1)
        return handled

    def _post_receives(self, n: int) -> None:
        sc = self.ep.scratch
        self.qp.post_recv(sc, [0] * n, sc.length, [0] * n)

    def _arm(self) -> None:
        if not self._armed:
            self.cq.req_notify()
            self._armed = True

    def _consume_event(self) -> None:
        """Take the channel's event if there is one (non-blocking), so its fd stops being readable."""
        try:
            self.channel.get_cq_event(self.cq)
        except self._pv.pyverbs_error.PyverbsError:
            return
        self.cq.ack_events(1)
        self._armed = False

    def _check_control(self) -> None:
        """ConnectionError when the peer closed its control socket (it died or dropped us)."""
        try:
            data = self.control.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            raise ConnectionError(f"{self.peer}: control connection lost ({e})") from e
        if not data:
            raise ConnectionError(f"{self.peer} closed the connection")
        raise ConnectionError(f"{self.peer} sent bytes on the control connection of an RDMA stream")

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Until ``ready()``: poll, arm, sleep on the channel fd (one thread at a time), poll again."""
        while True:
            self._check_open()
            self._progress()
            self._pump()
            if ready():
                return
            self._grant(force=True)  # a peer waiting for our grants must not wait for us
            self._check_control()
            if self._poller:  # another thread sleeps on the fd; it wakes us when it handles something
                self._lock.wait(0.05)
                continue
            self._arm()
            if self._progress():  # landed before the CQ was armed
                continue
            self._poller = True
            self._lock.release()
            # The ranker's returns wake nobody: while lends are out, re-read them (the grant above) often.
            lending = self._rx_bytes and self._returns_pending()
            try:
                select.select([self._chan_fd, self._kick, self.control], [], [],
                              _RETURNS_WAIT_S if lending else _WAIT_SLICE_S)
            finally:
                self._lock.acquire()
                self._poller = False
            self._check_open()
            try:
                os.eventfd_read(self._kick)
            except BlockingIOError:
                pass
            self._consume_event()

    def _settle(self) -> None:
        """Leave the fd truthful: armed for the next completion, the eventfd set iff bytes wait."""
        while True:
            self._pump()
            self._grant(force=not self._rx)
            self._arm()
            if not self._progress():
                break
        want = bool(self._rx) or bool(self._reads_done)
        if want != self._efd_set:
            if want:
                os.eventfd_write(self._efd, 1)
            else:
                try:
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
            self._efd_set = want

    # -- lifetime --------------------------------------------------------------------------
    def to_error(self) -> None:
        """Force the QP to the error state (tests: a peer whose QP breaks)."""
        with self._lock:
            self._check_open()
            self.qp.to_error()

    def state(self) -> str:
        return self.qp.state()

    def close(self) -> None:
        """Destroy the QP, CQ, channel and rings; any thread, also while another waits in this stream."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._lock.notify_all()
        for what in (self.qp.close, self._ack_all, self.cq.close, self.channel.close, self.rx.close, self.tx.close,
                     self._epoll.close, self._close_landing):
            try:
                what()
            except Exception:  # closing must not raise; the process may be going down anyway
                logger.debug("closing the RDMA stream to %s: %s failed", self.peer, what, exc_info=True)
        os.close(self._efd)
        os.close(self._kick)

    def _close_landing(self) -> None:
        # After the QP is gone nothing writes there: unlinked now, or once the ranker gave back its lends.
        if self.landing is not None:
            self.landing.close()

    def _ack_all(self) -> None:
        self._consume_event()

