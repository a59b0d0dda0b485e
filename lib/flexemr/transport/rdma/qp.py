"""RC queue pairs: creation, RESET -> INIT -> RTR -> RTS, the four operations, failure.

A ``QueuePair`` belongs to one ``Endpoint`` (its PD and CQ) and talks to one
peer.  Every work request is signalled, so each send-queue slot comes back as
exactly one completion (``send_done``) and ``send_free`` is the honest count
of what may still be posted; a post that does not fit returns False instead
of overrunning the queue.  Payloads are never copied: each post names a
registered ``Region`` and an offset, and the NIC reads or writes it in place.

Failure: any completion with a status other than success means the QP is in
the error state (RC QPs go there on the first failed WR and flush the rest),
and ``check`` raises ``QueuePairError`` naming the peer; posting to a QP that
is no longer RTS does the same.  A broken QP is never repaired in place: the
owner closes it and connects a fresh one.

The connection blob (blob.py) is re-exported here: it is what ``connect``
consumes.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, Sequence

from flexemr.transport.rdma.blob import MTUS, ConnectionBlob, RemoteRegion, gid_text
from flexemr.transport.rdma.endpoint import CompletionOwner, Endpoint, Region
from flexemr.transport.rdma.errors import QueuePairError

logger = logging.getLogger(__name__)

__all__ = ["ConnectionBlob", "QueuePair", "RemoteRegion"]

# Transport timers.  Local ACK timeout 4.096 us * 2**14 = 67 ms, 6 retries:
# a dead or broken peer is reported in well under a second on a NIC.  Both
# retry counts stay below 7, which means "retry forever" for RNR in the spec
# and for transport retries too in soft-RoCE (measured: a peer QP in the
# error state kept a sender retrying for minutes).  Credits keep senders
# within the receives the peer posted, so an RNR NAK only means a slow
# replenish, and 6 retries of the 164 ms RNR timer give a slow peer a second.
ACK_TIMEOUT = 14
RETRY_COUNT = 6
RNR_RETRY = 6
MIN_RNR_TIMER = 28  # 163.84 ms (IB encoding)
MAX_RD_ATOMIC = 16  # RDMA READs in flight per QP, capped by the device


class QueuePair:
    """One RC queue pair to ``peer`` on ``endpoint`` (see the module docstring)."""

    def __init__(self, endpoint: Endpoint, peer: str, owner: CompletionOwner, *, sl: int = 0,
                 traffic_class: int = 0, max_send_wr: int = 256, max_recv_wr: int = 256,
                 role: str = "data", cq: Any = None) -> None:
        endpoint.check_owner()
        pv = self._pv = endpoint.pv
        e = pv.enums
        if not 0 <= sl <= 15:
            raise ValueError(f"service level {sl} is outside 0..15")
        if not 0 <= traffic_class <= 255:
            raise ValueError(f"traffic class {traffic_class} is outside 0..255")
        self.endpoint = endpoint
        self.peer = peer
        self.owner = owner  # gets this QP's completions once connected
        self.role = role
        self.sl = sl
        self.traffic_class = traffic_class
        cap = pv.qp.QPCap(max_send_wr=max_send_wr, max_recv_wr=max_recv_wr, max_send_sge=1, max_recv_sge=1)
        # ``cq``: a completion queue of the QP's own (a daemon Connection polls
        # and waits on it alone); by default the endpoint's shared one.
        cq = endpoint.cq if cq is None else cq
        init = pv.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0)
        self._qp = pv.qp.QP(endpoint.pd, init)
        self.qpn = int(self._qp.qp_num)
        self.psn = secrets.randbelow(1 << 24)
        self.max_send_wr = max_send_wr
        self.max_recv_wr = max_recv_wr
        self.send_free = max_send_wr
        self.rd_atomic = max(1, min(MAX_RD_ATOMIC, endpoint.max_rd_atomic))
        self.connected_to: int | None = None
        self.failed: QueuePairError | None = None
        attr = pv.qp.QPAttr(qp_state=e.IBV_QPS_INIT, port_num=endpoint.device.port)
        attr.pkey_index = 0
        attr.qp_access_flags = (e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
                                | e.IBV_ACCESS_REMOTE_READ)
        self._qp.to_init(attr)

    # -- state ------------------------------------------------------------------
    def connect(self, remote_qpn: int, remote_psn: int, remote_gid: bytes, remote_mtu: int) -> None:
        """INIT -> RTR -> RTS towards the peer's QP; the path MTU is the smaller of both ports'."""
        pv, e = self._pv, self._pv.enums
        dev = self.endpoint.device
        mtu = min(dev.mtu, remote_mtu)
        if mtu not in MTUS:
            raise ValueError(f"path MTU {mtu} is not one of {MTUS}")
        gr = pv.addr.GlobalRoute(dgid=pv.addr.GID(gid_text(remote_gid)), sgid_index=dev.gid_index,
                                 hop_limit=64, traffic_class=self.traffic_class)
        ah = pv.addr.AHAttr(port_num=dev.port, is_global=1, gr=gr, dlid=0, sl=self.sl)
        attr = pv.qp.QPAttr(qp_state=e.IBV_QPS_RTR)
        attr.ah_attr = ah
        attr.path_mtu = MTUS.index(mtu) + 1  # IBV_MTU_256 == 1 ... IBV_MTU_4096 == 5
        attr.dest_qp_num = remote_qpn
        attr.rq_psn = remote_psn
        attr.max_dest_rd_atomic = self.rd_atomic
        attr.min_rnr_timer = MIN_RNR_TIMER
        self._qp.to_rtr(attr)
        attr.qp_state = e.IBV_QPS_RTS
        attr.timeout = ACK_TIMEOUT
        attr.retry_cnt = RETRY_COUNT
        attr.rnr_retry = RNR_RETRY
        attr.sq_psn = self.psn
        attr.max_rd_atomic = self.rd_atomic
        self._qp.to_rts(attr)
        self.connected_to = remote_qpn
        self.endpoint.attach(self.qpn, self.owner)
        logger.debug("QP 0x%06x (%s) -> %s QP 0x%06x: RTS, mtu %d, sl %d, tc %d", self.qpn, self.role,
                     self.peer, remote_qpn, mtu, self.sl, self.traffic_class)

    def state(self) -> str:
        """The QP state as the device reports it ("RTS", "ERR", ...)."""
        attr, _ = self._qp.query(self._pv.enums.IBV_QP_STATE)
        return _QP_STATES.get(int(attr.qp_state), str(attr.qp_state))

    def query_route(self) -> tuple[int, int]:
        """(service level, traffic class) as the device holds them for this QP's path.

        Soft-RoCE keeps the traffic class (it becomes the IP header's DSCP/ECN
        byte) but does not store the SL, which it reports as 0.
        """
        attr, _ = self._qp.query(self._pv.enums.IBV_QP_AV)
        return int(attr.ah_attr.sl), int(attr.ah_attr.traffic_class)

    def to_error(self) -> None:
        """Move the QP to the error state (flushes every outstanding WR)."""
        attr = self._pv.qp.QPAttr(qp_state=self._pv.enums.IBV_QPS_ERR)
        self._qp.modify(attr, self._pv.enums.IBV_QP_STATE)

    def check(self, wc: Any) -> None:
        """Raise QueuePairError (and remember it) when ``wc`` reports a failure."""
        if wc.status == 0:  # IBV_WC_SUCCESS
            return
        status = self._pv.enums.ibv_wc_status(wc.status).name
        if self.failed is None:
            self.failed = QueuePairError(self.peer, self.qpn,
                                         f"{status} on {self.role} QP (wr_id {wc.wr_id}, vendor error {wc.vendor_err})")
        raise self.failed

    def send_done(self) -> None:
        """One signalled send-queue WR completed: its slot is free again."""
        self.send_free += 1

    # -- posting ------------------------------------------------------------------
    def _post(self, wr: Any) -> bool:
        if self.failed is not None:
            raise self.failed
        if self.send_free <= 0:
            return False
        try:
            self._qp.post_send(wr)
        except self._pv.pyverbs_error.PyverbsError as ex:
            self.failed = QueuePairError(self.peer, self.qpn, f"post_send refused ({ex}); state {self.state()}")
            raise self.failed from ex
        self.send_free -= 1
        return True

    def _sge(self, region: Region, offset: int, nbytes: int, what: str) -> Any:
        return self._pv.wr.SGE(region.address(offset, nbytes, what), nbytes, region.lkey)

    def post_send(self, region: Region, offset: int, nbytes: int, *, wr_id: int, imm: int | None = None) -> bool:
        """SEND ``region[offset:offset+nbytes]`` into the peer's next posted receive (False: queue full)."""
        e = self._pv.enums
        sge = self._sge(region, offset, nbytes, f"SEND to {self.peer}")
        op = e.IBV_WR_SEND if imm is None else e.IBV_WR_SEND_WITH_IMM
        wr = self._pv.wr.SendWR(wr_id=wr_id, opcode=op, num_sge=1, sg=[sge], send_flags=e.IBV_SEND_SIGNALED)
        if imm is not None:
            wr.imm_data = imm
        return self._post(wr)

    def post_write_imm(self, region: Region, offset: int, nbytes: int, remote: RemoteRegion, remote_offset: int,
                       *, imm: int, wr_id: int) -> bool:
        """RDMA WRITE WITH IMM: bytes land at ``remote[remote_offset:]``; the peer's receive gets ``imm``."""
        e = self._pv.enums
        sge = self._sge(region, offset, nbytes, f"WRITE to {self.peer}")
        dst = remote.check(remote_offset, nbytes, f"WRITE to {self.peer}")
        wr = self._pv.wr.SendWR(wr_id=wr_id, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1, sg=[sge],
                                send_flags=e.IBV_SEND_SIGNALED)
        wr.imm_data = imm
        wr.set_wr_rdma(remote.rkey, dst)
        return self._post(wr)

    def post_read(self, region: Region, offset: int, nbytes: int, remote: RemoteRegion, remote_offset: int,
                  *, wr_id: int) -> bool:
        """RDMA READ ``remote[remote_offset:remote_offset+nbytes]`` into ``region[offset:]`` (no peer CPU)."""
        e = self._pv.enums
        sge = self._sge(region, offset, nbytes, f"READ from {self.peer}")
        src = remote.check(remote_offset, nbytes, f"READ from {self.peer}")
        wr = self._pv.wr.SendWR(wr_id=wr_id, opcode=e.IBV_WR_RDMA_READ, num_sge=1, sg=[sge],
                                send_flags=e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(remote.rkey, src)
        return self._post(wr)

    def post_reads(self, region: Region, offsets: Sequence[int], nbytes: Sequence[int], remote: RemoteRegion,
                   remote_offsets: Sequence[int], wr_ids: Sequence[int]) -> int:
        """RDMA READs ``remote[remote_offsets[i]:+nbytes[i]]`` into ``region[offsets[i]:]``, chained into ONE
        doorbell; posts as many as the send queue takes (in order) and returns how many."""
        if self.failed is not None:
            raise self.failed
        n = min(len(offsets), self.send_free)
        if n <= 0:
            return 0
        e = self._pv.enums
        # Every bound is checked before anything is posted: a bad offset posts nothing.
        dst = [region.address(int(o), int(k), f"READ from {self.peer}") for o, k in zip(offsets[:n], nbytes[:n])]
        src = [remote.check(int(o), int(k), f"READ from {self.peer}") for o, k in zip(remote_offsets[:n], nbytes[:n])]
        chain: list[Any] = []   # pyverbs keeps no reference to next_wr: hold every WR until posted
        wr = None
        for i in range(n - 1, -1, -1):
            sge = self._pv.wr.SGE(dst[i], int(nbytes[i]), region.lkey)
            wr = self._pv.wr.SendWR(wr_id=int(wr_ids[i]), opcode=e.IBV_WR_RDMA_READ, num_sge=1, sg=[sge],
                                    send_flags=e.IBV_SEND_SIGNALED, next_wr=wr)
            wr.set_wr_rdma(remote.rkey, src[i])
            chain.append(wr)
        try:
            self._qp.post_send(wr)
        except self._pv.pyverbs_error.PyverbsError as ex:
            self.failed = QueuePairError(self.peer, self.qpn, f"post_send (READ) refused ({ex}); state {self.state()}")
            raise self.failed from ex
        self.send_free -= n
        return n

    def post_recv(self, region: Region, offsets: list[int], nbytes: int, wr_ids: list[int]) -> None:
        """Post one receive per (offset, wr_id), chained into a single doorbell."""
        if self.failed is not None:
            raise self.failed
        # pyverbs links next_wr by pointer without keeping the Python object
        # alive: every WR of the chain stays referenced here until posted.
        chain: list[Any] = []
        wr = None
        for off, wr_id in zip(reversed(offsets), reversed(wr_ids)):
            sge = self._sge(region, off, nbytes, f"receive from {self.peer}")
            wr = self._pv.wr.RecvWR(wr_id=wr_id, num_sge=1, sg=[sge], next_wr=wr)
            chain.append(wr)
        if wr is None:
            return
        try:
            self._qp.post_recv(wr)
        except self._pv.pyverbs_error.PyverbsError as ex:
            self.failed = QueuePairError(self.peer, self.qpn, f"post_recv refused ({ex}); state {self.state()}")
            raise self.failed from ex

    def close(self) -> None:
        self.endpoint.detach(self.qpn)
        self._qp.close()

    def __repr__(self) -> str:
        return f"QueuePair(0x{self.qpn:06x} {self.role} -> {self.peer})"


_QP_STATES = {0: "RESET", 1: "INIT", 2: "RTR", 3: "RTS", 4: "SQD", 5: "SQE", 6: "ERR"}


def connect_pair(qp: QueuePair, credit: QueuePair, blob: ConnectionBlob) -> None:
    """Connect a data QP and a credit QP to the peer described by ``blob``."""
    qp.connect(blob.qpn, blob.psn, blob.gid, blob.mtu)
    credit.connect(blob.credit_qpn, blob.credit_psn, blob.gid, blob.mtu)
