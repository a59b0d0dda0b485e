"""RdmaChannel: one ranker <-> embedding-server connection over two RC queue pairs.

What the daemon plugs in (the engine holds a ``RankerChannel`` per server it
owns; the embedding server a ``ServerChannel`` per ranker engine)::

    ranker (engine)                                 embedding server
    ---------------                                 ----------------
    request memory (registered) --SEND+imm(id)-->   receive slots (posted ahead)
                                                    pool the request ...
    completion memory (registered) <--WRITE+imm(id)-- reply memory (registered)
      (the partials land at the offset the           (WRITE WITH IMM straight
       request named; the ranker's receive            into the ranker's region)
       completes with imm = id, no copy)
    credits  <--SEND+imm(n) on the credit QP--      grant n after n receives are reposted
    cache fill --RDMA READ (no server CPU)-->       table memory (registered, read-only)

The data QP runs at the default service level; the credit QP at
``CREDIT_SL`` / ``CREDIT_TRAFFIC_CLASS`` (DSCP 46, expedited forwarding), so a
switch with priority queues forwards credit grants ahead of bulk partials.
``credits="in_band"`` (for comparison) sends the grants on the data QP
instead, behind the partials; both ends must agree (the blob's flag says).

Flow control: the server posts ``recv_slots`` receives and announces them in
its blob; that is the ranker's initial credit.  Each SEND spends one credit;
the server grants credits back on the credit QP as it reposts receives.  So a
SEND never finds the peer without a posted receive, and the ranker never
blocks in the NIC: ``send_lookup`` returns False instead (a status, not an
exception, like a full ring).

Events come back from ``wait(timeout_s)`` as small records (``Response``,
``Request``, ``SendDone``, ``ReadDone``...); a failed QP raises
``QueuePairError`` naming the peer, after the events that completed before it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexemr.transport.rdma.blob import FLAG_CREDITS_IN_BAND, ConnectionBlob, RemoteRegion
from flexemr.transport.rdma.endpoint import Endpoint, Region
from flexemr.transport.rdma.errors import BlobError, QueuePairError
from flexemr.transport.rdma.qp import QueuePair, connect_pair

logger = logging.getLogger(__name__)

DATA_SL = 0
DATA_TRAFFIC_CLASS = 0
CREDIT_SL = 5
CREDIT_TRAFFIC_CLASS = 46 << 2  # DSCP EF in the upper six bits, ECN bits clear
CREDIT_RECV_DEPTH = 64
CREDIT_MODES = ("priority", "in_band")

# wr_id spaces: receives carry their slot index; sends carry the caller's id
# with a tag in the top bits so completions of different kinds never collide.
_RECV_SCRATCH = 1 << 62
_KIND_SHIFT = 56
_KIND_SEND, _KIND_WRITE, _KIND_READ, _KIND_CREDIT = 1, 2, 3, 4
_ID_MASK = (1 << _KIND_SHIFT) - 1
_IMM_MAX = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class Response:
    """Ranker: the server's reply to request ``imm`` landed in completion memory (``nbytes`` bytes)."""

    imm: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Request:
    """Server: a SEND from the ranker, in receive slot ``slot`` (``release`` it when done)."""

    slot: int
    imm: int
    nbytes: int
    view: memoryview


@dataclass(frozen=True, slots=True)
class SendDone:
    """A SEND left the local memory it was posted from (the bytes may be reused)."""

    wr_id: int


@dataclass(frozen=True, slots=True)
class WriteDone:
    """Server: a WRITE WITH IMM reply completed at the ranker."""

    wr_id: int


@dataclass(frozen=True, slots=True)
class ReadDone:
    """Ranker: an RDMA READ finished; its bytes are in local memory."""

    wr_id: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class CreditGrant:
    """Ranker: the server granted ``credits`` more SENDs."""

    credits: int


class RdmaChannel:
    """What both ends share: the two QPs, the blob, completion routing and the error path."""

    def __init__(self, endpoint: Endpoint, peer: str, *, depth: int, recv_slots: int = 0,
                 recv_slot_bytes: int = 0, regions: tuple[Region, ...] = (), credits: str = "priority") -> None:
        if credits not in CREDIT_MODES:
            raise ValueError(f"credits = {credits!r}: expected one of {CREDIT_MODES}")
        self.in_band = credits == "in_band"
        # in band, grants use receives of the data QP as well as replies do
        data_recv = 2 * depth if self.in_band else depth
        self.endpoint = endpoint
        self.peer = peer
        self.depth = depth
        self.recv_slots = recv_slots
        self.recv_slot_bytes = recv_slot_bytes
        self.regions = regions
        self.data = QueuePair(endpoint, peer, self, sl=DATA_SL, traffic_class=DATA_TRAFFIC_CLASS,
                              max_send_wr=depth, max_recv_wr=max(data_recv, recv_slots, 1), role="data")
        self.credit = QueuePair(endpoint, peer, self, sl=CREDIT_SL, traffic_class=CREDIT_TRAFFIC_CLASS,
                                max_send_wr=CREDIT_RECV_DEPTH, max_recv_wr=CREDIT_RECV_DEPTH, role="credit")
        self.remote: ConnectionBlob | None = None
        self._scratch_owed = {self.data.qpn: 0, self.credit.qpn: 0}
        self.bytes_sent = 0  # payload bytes this side posted through verbs (SEND, WRITE)
        self.bytes_read = 0  # payload bytes fetched by RDMA READ
        self.closed = False

    # -- connection set-up ---------------------------------------------------------
    def blob(self) -> bytes:
        """This side's connection blob (goes into the HELLO)."""
        dev = self.endpoint.device
        return ConnectionBlob(self.data.qpn, self.data.psn, self.credit.qpn, self.credit.psn, dev.gid, dev.mtu,
                              self.recv_slots, self.recv_slot_bytes,
                              FLAG_CREDITS_IN_BAND if self.in_band else 0,
                              tuple(r.remote() for r in self.regions)).pack()

    def connect(self, remote_blob: bytes | ConnectionBlob) -> None:
        """Bring both QPs to RTS towards the peer and post the receives."""
        blob = remote_blob if isinstance(remote_blob, ConnectionBlob) else ConnectionBlob.unpack(remote_blob)
        if bool(blob.flags & FLAG_CREDITS_IN_BAND) != self.in_band:
            mine, theirs = ("in_band", "priority") if self.in_band else ("priority", "in_band")
            raise BlobError(f"connection blob: {self.peer} sends credits {theirs}, this side expects {mine}")
        connect_pair(self.data, self.credit, blob)
        self.remote = blob
        self._post_initial_receives()
        logger.info("RDMA channel to %s: data QP 0x%06x -> 0x%06x, credit QP 0x%06x -> 0x%06x (sl %d tc %d)%s",
                    self.peer, self.data.qpn, blob.qpn, self.credit.qpn, blob.credit_qpn, CREDIT_SL,
                    CREDIT_TRAFFIC_CLASS, ", credits in band" if self.in_band else "")

    def _post_initial_receives(self) -> None:
        raise NotImplementedError

    def _post_scratch(self, qp: QueuePair, n: int) -> None:
        if n > 0:
            sc = self.endpoint.scratch
            qp.post_recv(sc, [0] * n, sc.length, [_RECV_SCRATCH] * n)

    # -- completions ------------------------------------------------------------------
    def handle(self, wc: Any) -> object | None:
        """Turn one work completion of this channel into an event (or raise QueuePairError)."""
        qp = self.data if wc.qp_num == self.data.qpn else self.credit
        qp.check(wc)
        return self._event(qp, wc)

    def _event(self, qp: QueuePair, wc: Any) -> object | None:
        raise NotImplementedError

    def replenish(self) -> None:
        """Repost the immediate-only receives consumed by the last batch (one doorbell per QP)."""
        for qp in (self.data, self.credit):
            owed = self._scratch_owed[qp.qpn]
            if owed and qp.failed is None:
                self._post_scratch(qp, owed)
                self._scratch_owed[qp.qpn] = 0

    def wait(self, timeout_s: float | None) -> list[object]:
        """This channel's next events, waiting up to ``timeout_s`` if there are none yet."""
        events = self.endpoint.take(self)
        if not events:
            self.endpoint.collect(timeout_s)
            events = self.endpoint.take(self)
        for i, ev in enumerate(events):
            if isinstance(ev, QueuePairError):
                # Hand back what completed before the failure; the error comes next call.
                if i == 0:
                    raise ev
                self.endpoint.put_back(self, events[i:])
                return events[:i]
        return events

    @property
    def failed(self) -> QueuePairError | None:
        """The first failure of either QP, if any."""
        return self.data.failed or self.credit.failed

    def qp_states(self) -> tuple[str, str]:
        """(data, credit) QP states as the device reports them."""
        return self.data.state(), self.credit.state()

    def force_error(self) -> None:
        """Move both QPs to the error state (tests; also a hard reset before close)."""
        self.data.to_error()
        self.credit.to_error()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.endpoint.forget(self)
        self.data.close()
        self.credit.close()

    def _remote(self) -> ConnectionBlob:
        if self.remote is None:
            raise RuntimeError(f"RDMA channel to {self.peer} is not connected yet")
        return self.remote


class RankerChannel(RdmaChannel):
    """Ranker end: SENDs lookups, receives replies written into its completion memory.

    ``requests`` holds the outgoing lookup frames; ``completions`` is where the
    server writes replies (announced to the server as region 0 of the blob).
    """

    def __init__(self, endpoint: Endpoint, peer: str, requests: Region, completions: Region, *,
                 depth: int = 256, credits: str = "priority") -> None:
        super().__init__(endpoint, peer, depth=depth, regions=(completions,), credits=credits)
        self.requests = requests
        self.completions = completions
        self.credits = 0

    def _post_initial_receives(self) -> None:
        remote = self._remote()
        # More credits than receives for replies would let the server's writes
        # meet an empty receive queue: never grant ourselves more than we posted.
        self.credits = min(remote.recv_slots, self.depth)
        self._post_scratch(self.data, 2 * self.depth if self.in_band else self.depth)
        self._post_scratch(self.credit, CREDIT_RECV_DEPTH)

    def send_lookup(self, request_id: int, offset: int, nbytes: int) -> bool:
        """SEND ``requests[offset:offset+nbytes]`` with immediate ``request_id``.

        False when no credit or no send-queue slot is left (retry after
        ``wait``).  The request bytes must stay untouched until ``SendDone``.
        """
        remote = self._remote()
        if not 0 <= request_id <= _IMM_MAX:
            raise ValueError(f"request id {request_id} does not fit the 32-bit immediate")
        if nbytes > remote.recv_slot_bytes:
            raise ValueError(f"lookup of {nbytes} bytes exceeds {self.peer}'s receive slots of "
                             f"{remote.recv_slot_bytes} bytes")
        if self.credits <= 0:
            return False
        if not self.data.post_send(self.requests, offset, nbytes, wr_id=(_KIND_SEND << _KIND_SHIFT) | request_id,
                                   imm=request_id):
            return False
        self.credits -= 1
        self.bytes_sent += nbytes
        return True

    def table(self, index: int) -> RemoteRegion:
        """The server's registered region ``index`` (a table it lets this ranker READ)."""
        regions = self._remote().regions
        if not 0 <= index < len(regions):
            raise ValueError(f"{self.peer} registered {len(regions)} regions; there is no region {index}")
        return regions[index]

    def read(self, table: int, remote_offset: int, dest: Region, dest_offset: int, nbytes: int, *,
             wr_id: int) -> bool:
        """One RDMA READ from the server's region ``table`` (False: send queue full)."""
        ok = self.data.post_read(dest, dest_offset, nbytes, self.table(table), remote_offset,
                                 wr_id=(_KIND_READ << _KIND_SHIFT) | wr_id)
        if ok:
            self.bytes_read += nbytes
        return ok

    def read_rows(self, table: int, ids: np.ndarray, row_bytes: int, dest: Region, dest_offset: int = 0, *,
                  timeout_s: float = 30.0) -> int:
        """Fetch rows ``ids`` of a registered [rows, row_bytes] table into ``dest`` (row i at dest_offset + i*row_bytes).

        Consecutive ids become one READ each (found with numpy, not a loop
        over rows); waits for every READ to finish.  Returns the READs posted.
        Events of other kinds that arrive meanwhile stay queued for ``wait``.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return 0
        rows = self.table(table).length // row_bytes
        if ids.min() < 0 or ids.max() >= rows:
            raise ValueError(f"read_rows: ids must be in [0, {rows}) for region {table} of {self.peer}")
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.concatenate((starts, [ids.size])))
        first_ids = ids[starts]
        posted = done = 0
        pending: list[object] = []
        for run, (pos, first, n) in enumerate(zip(starts.tolist(), first_ids.tolist(), lengths.tolist())):
            while not self.read(table, first * row_bytes, dest, dest_offset + pos * row_bytes, n * row_bytes,
                                wr_id=run):
                done += self._wait_reads(timeout_s, pending)
            posted += 1
        while done < posted:
            done += self._wait_reads(timeout_s, pending)
        self.endpoint.put_back(self, pending)
        return posted

    def _wait_reads(self, timeout_s: float, keep: list[object]) -> int:
        events = self.wait(timeout_s)
        if not events:
            raise QueuePairError(self.peer, self.data.qpn, f"RDMA READ not completed within {timeout_s} s")
        n = 0
        for ev in events:
            if isinstance(ev, ReadDone):
                n += 1
            else:
                keep.append(ev)
        return n

    def _event(self, qp: QueuePair, wc: Any) -> object | None:
        e = self.endpoint.pv.enums
        op = wc.opcode
        if op == e.IBV_WC_RECV_RDMA_WITH_IMM:
            self._scratch_owed[qp.qpn] += 1
            return Response(int(wc.imm_data), int(wc.byte_len))
        if op == e.IBV_WC_RECV:
            self._scratch_owed[qp.qpn] += 1
            if qp is not self.credit and not self.in_band:  # a stray SEND is not a credit
                return None
            self.credits += int(wc.imm_data)
            return CreditGrant(int(wc.imm_data))
        qp.send_done()
        if op == e.IBV_WC_RDMA_READ:
            return ReadDone(int(wc.wr_id) & _ID_MASK, int(wc.byte_len))
        if op == e.IBV_WC_SEND:
            return SendDone(int(wc.wr_id) & _ID_MASK)
        return None


class ServerChannel(RdmaChannel):
    """Embedding-server end: receives lookups into posted slots, replies by WRITE WITH IMM.

    ``receive`` is divided into ``recv_slots`` slots of ``recv_slot_bytes``;
    ``replies`` is the memory replies are written from; ``tables`` are the
    regions the ranker may READ (announced in the blob, in order).
    """

    def __init__(self, endpoint: Endpoint, peer: str, receive: Region, replies: Region, *, recv_slots: int,
                 tables: tuple[Region, ...] = (), depth: int = 256, credits: str = "priority") -> None:
        if recv_slots <= 0 or receive.length // recv_slots == 0:
            raise ValueError(f"receive region of {receive.length} bytes cannot hold {recv_slots} slots")
        slot_bytes = receive.length // recv_slots
        super().__init__(endpoint, peer, depth=depth, recv_slots=recv_slots, recv_slot_bytes=slot_bytes,
                         regions=tables, credits=credits)
        self.receive = receive
        self.replies = replies
        self._grant = 0

    def _post_initial_receives(self) -> None:
        self._post_slots(list(range(self.recv_slots)))
        self._post_scratch(self.credit, CREDIT_RECV_DEPTH)

    def _post_slots(self, slots: list[int]) -> None:
        size = self.recv_slot_bytes
        self.data.post_recv(self.receive, [s * size for s in slots], size, slots)

    def reply(self, request_imm: int, offset: int, nbytes: int, dest_offset: int, *, wr_id: int = 0) -> bool:
        """WRITE WITH IMM ``replies[offset:offset+nbytes]`` to the ranker's completion memory at ``dest_offset``.

        False when the send queue is full (retry after ``wait``).
        """
        if not 0 <= request_imm <= _IMM_MAX:
            raise ValueError(f"request id {request_imm} does not fit the 32-bit immediate")
        ok = self.data.post_write_imm(self.replies, offset, nbytes, self._remote().regions[0], dest_offset,
                                      imm=request_imm, wr_id=(_KIND_WRITE << _KIND_SHIFT) | wr_id)
        if ok:
            self.bytes_sent += nbytes
        return ok

    def release(self, slots: list[int]) -> None:
        """Repost these receive slots (one doorbell) and owe the ranker that many credits."""
        self._post_slots(slots)
        self._grant += len(slots)

    def grant(self) -> bool:
        """Send the credits owed since the last grant (False: nothing owed or queue full).

        On the credit QP; on the data QP, behind the replies, with ``credits="in_band"``.
        """
        if self._grant == 0:
            return False
        qp = self.data if self.in_band else self.credit
        ok = qp.post_send(self.endpoint.scratch, 0, 0, wr_id=(_KIND_CREDIT << _KIND_SHIFT), imm=self._grant)
        if ok:
            self._grant = 0
        return ok

    def _event(self, qp: QueuePair, wc: Any) -> object | None:
        e = self.endpoint.pv.enums
        op = wc.opcode
        if op == e.IBV_WC_RECV:
            if qp is self.credit:  # rankers grant nothing; keep the scratch receive posted
                self._scratch_owed[qp.qpn] += 1
                return None
            slot = int(wc.wr_id)
            n = int(wc.byte_len)
            return Request(slot, int(wc.imm_data), n, self.receive.view(slot * self.recv_slot_bytes, n))
        qp.send_done()
        if op == e.IBV_WC_RDMA_WRITE:
            return WriteDone(int(wc.wr_id) & _ID_MASK)
        return None
