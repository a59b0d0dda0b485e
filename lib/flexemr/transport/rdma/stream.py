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

What is still a copy (docs/RDMA.md): the sender copies frame bytes into its
tx ring (one memcpy, numpy) and the receiver copies them out of its rx ring
into the caller's view (the engine's completion-ring slot, the server's
request buffer).  Zero-copy landing in the ranker's completion ring needs the
ring itself registered (the verbs channel in channel.py does that; the
daemon's engine does not use it yet).

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
from flexemr.transport.rdma.endpoint import POLL_BATCH, Endpoint, Region
from flexemr.transport.rdma.errors import BlobError
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


class _NoOwner:
    """QueuePair wants an owner for the endpoint's shared CQ; this stream polls its own CQ."""

    def handle(self, wc: Any) -> object | None:
        return None

    def replenish(self) -> None:
        return None


class FrameStream:
    """One connection's bytes over verbs (see the module docstring)."""

    def __init__(self, endpoint: Endpoint, peer: str, control: socket.socket, *, priority: bool = False) -> None:
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
        self.rx = endpoint.register(np.zeros(ring, np.uint8), remote_write=True)
        self.tx = endpoint.register(np.zeros(ring, np.uint8))
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
        return ConnectionBlob(self.qp.qpn, self.qp.psn, self.qp.qpn, self.qp.psn, dev.gid, dev.mtu,
                              self.slots, self.slot_bytes, FLAG_FRAME_STREAM, (self.rx.remote(),),
                              version=2 if v2 else 1, accepts=VERSION, tables=tables if v2 else (),
                              boot_version=boot_version if v2 else 0).pack()

    def connect(self, blob: ConnectionBlob) -> None:
        """RTR/RTS towards the peer's QP and post the receives; writes may arrive from now on."""
        if not blob.flags & FLAG_FRAME_STREAM or len(blob.regions) != 1:
            raise BlobError(f"connection blob from {self.peer} is not a frame stream's (flags 0x{blob.flags:x}, "
                            f"{len(blob.regions)} regions)")
        if blob.regions[0].length < blob.recv_slots * blob.recv_slot_bytes or blob.recv_slots == 0:
            raise BlobError(f"connection blob from {self.peer}: its ring of {blob.regions[0].length} bytes cannot "
                            f"hold {blob.recv_slots} slots of {blob.recv_slot_bytes}")
        self.peer_blob = blob
        self._peer_slots = blob.recv_slots
        self._peer_slot_bytes = blob.recv_slot_bytes
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
        while self._backlog and self._can_write():
            head = self._backlog[0]
            n = min(len(head), self._chunk)
            self._write(memoryview(head)[:n])
            if n == len(head):
                self._backlog.popleft()
            else:
                self._backlog[0] = head[n:]

    def _read(self, view: memoryview) -> int:
        got = 0
        rx = self._rx
        while rx and got < len(view):
            r = rx[0]
            k = min(r[1] - r[0], len(view) - got)
            view[got:got + k] = self._rx_view[r[0]:r[0] + k]
            r[0] += k
            got += k
            if r[0] == r[1]:
                rx.popleft()
                self._rx_owed += 1
        if got:
            self.bytes_received += got
            self._grant(force=False)
        return got

    def _grant(self, force: bool) -> None:
        if self._rx_owed and (force or self._rx_owed >= self._grant_every) and self.qp.send_free > 0:
            self.qp.post_send(self.ep.scratch, 0, 0, wr_id=_WR_GRANT, imm=self._rx_owed)
            self._rx_owed = 0

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
                    start = self._rx_next * self.slot_bytes
                    self._rx.append([start, start + nbytes])
                    self._rx_next = (self._rx_next + 1) % self.slots
                    self._reposts += 1
                elif op == self._op_recv:
                    self._tx_credits += int(wc.imm_data)
                    self._reposts += 1
                else:
                    self.qp.send_done()
                    wr_id = int(wc.wr_id)
                    if wr_id == _WR_DATA:
                        self._tx_busy -= 1
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
            try:
                select.select([self._chan_fd, self._kick, self.control], [], [], _WAIT_SLICE_S)
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
                     self._epoll.close):
            try:
                what()
            except Exception:  # closing must not raise; the process may be going down anyway
                logger.debug("closing the RDMA stream to %s: %s failed", self.peer, what, exc_info=True)
        os.close(self._efd)
        os.close(self._kick)

    def _ack_all(self) -> None:
        self._consume_event()

