"""Engine worker: owns a set of connections to embedding servers and one parallelism unit.

With TCP the unit is the engine's own process, sockets and threads; with
RDMA it is a thread domain + parent domain.  No two engines share a
connection ("owned" mapping), so nothing on the hot path takes a lock.

Threads, each the only producer or consumer of what it touches:

    sender    drains the submission ring; sends each frame on its connection
              straight from the ring slot (no copy in Python)
    receiver  polls the connections; receives each response header, reserves
              a completion-ring slot of the exact size and ``recv_into``s the
              payload there, then rings the inference doorbell once
    handoff   receives migrated connections (SCM_RIGHTS on an abstract unix
              socket) from other engines

Migration out: the inference puts SUB_MIGRATE(conn, to) in this engine's ring
after the last subrequest it routes here for ``conn``; the sender waits until
that connection's in-flight subrequests are answered, the receiver lets go of
it, and the socket itself moves to the other process: nothing reconnects.
"""

from __future__ import annotations

import array
import logging
import os
import selectors
import socket
import struct
import threading
import time
from typing import Callable

from flexemr import enginemsg as em
from flexemr.transport.base import Connection, Transport
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, ErrorCode, FrameFlag, FrameType, pack_header_into

logger = logging.getLogger(__name__)

_HANDOFF = struct.Struct("<IIIQ64s")  # conn_id, server, kind, in-flight subrequests, address
HANDOFF_OWN = 0      # migration: the receiver becomes the owner
HANDOFF_SHARE = 1    # "shared" mapping: a send-only copy for a non-owner engine


def handoff_address(instance: str, engine_id: int) -> bytes:
    """Abstract-namespace unix address: nothing to clean up in the filesystem."""
    return f"\0flexemr.{instance}.engine{engine_id}.handoff".encode()


class ConnState:
    __slots__ = ("conn", "credit_conn", "sent", "received", "bytes_sent", "bytes_received", "rtt_ns", "sent_at",
                 "grants_made", "grants_sent", "grant_ns", "granted")

    def __init__(self, conn: Connection, credit_conn: Connection | None = None) -> None:
        self.conn = conn
        self.credit_conn = credit_conn
        # In-band credits: the receiver counts grants made, the sender grants sent;
        # two single-writer counters instead of one shared one (no lost updates).
        self.grants_made = 0
        self.grants_sent = 0
        self.grant_ns = 0
        self.granted = 0
        self.sent = 0
        self.received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rtt_ns: list[int] = []
        self.sent_at: dict[int, int] = {}

    @property
    def inflight(self) -> int:
        return self.sent - self.received


class Engine:
    """One engine worker's data path (the process entry is ``run_engine``)."""

    def __init__(
        self,
        engine_id: int,
        instance: str,
        transport: Transport,
        submission,
        completion,
        connections: dict[int, tuple[int, str]],
        owned: list[int],
        publish: Callable[["Engine"], None] | None = None,
        credits: str = "off",
        credits_per_connection: int = 4,
        token: str = "ranker",
        expected_shards: dict[int, list[tuple[int, int, int, int]]] | None = None,
        shared_locks: dict[int, object] | None = None,
        n_engines: int = 1,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.heartbeat = heartbeat or (lambda: None)  # ReadyPipe.beat: the supervisor's liveness check
        # "shared" mapping (the contention FlexEMR removes, kept for comparison):
        # every engine may send on every connection under a cross-process lock.
        self.shared_locks = shared_locks
        self.shared_send: dict[int, Connection] = {}
        self.n_engines = n_engines
        self.id = engine_id
        self.credit_mode = credits
        self.initial_credits = credits_per_connection if credits != "off" else 0
        self.token = token
        self.expected_shards = expected_shards or {}
        self.instance = instance
        self.transport = transport
        self.sub = submission
        self.comp = completion
        self.directory = connections  # conn_id -> (server, address), all connections
        self.conns: dict[int, ConnState] = {}
        self._conns_changed = threading.Condition()
        self.publish = publish or (lambda e: None)
        self.stop = threading.Event()
        self.subrequests = 0
        self.busy_ns = 0
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._sel_ops: list[tuple[str, int, threading.Event | None]] = []
        self._sel_lock = threading.Lock()
        self._handoff = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._handoff.bind(handoff_address(instance, engine_id))
        self._handoff.settimeout(0.2)
        for cid in owned:
            server, address = connections[cid]
            self._add(*self._open(cid, server, address))

    def share_connections(self) -> None:
        """Shared mapping: give every other engine a send-only copy of our sockets."""
        for cid, st in self.conns.items():
            for e in range(self.n_engines):
                if e != self.id:
                    self._send_fds(e, cid, HANDOFF_SHARE, [st.conn.fileno()])

    def _send_fds(self, to_engine: int, cid: int, kind: int, fds: list[int], inflight: int = 0) -> None:
        server, address = self.directory[cid]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            deadline = time.monotonic() + 30
            while True:
                try:
                    # socket.send_fds ignores its address argument on Python 3.11: sendmsg directly.
                    s.sendmsg([_HANDOFF.pack(cid, server, kind, inflight, address.encode())],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], 0,
                              handoff_address(self.instance, to_engine))
                    return
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:  # the other engine never came up
                        raise
                    time.sleep(0.05)

    def _open(self, cid: int, server: int, address: str) -> tuple[Connection, Connection | None]:
        """Connect, introduce ourselves, check the server holds what routing expects."""
        conn = self.transport.connect(address, cid, server)
        self._hello(conn, "data", self.initial_credits)
        credit_conn = None
        if self.credit_mode == "priority":
            credit_conn = self.transport.connect(address, cid, server, priority=True)
            self._hello(credit_conn, "credit", 0)
        return conn, credit_conn

    def _hello(self, conn: Connection, channel: str, credits: int) -> None:
        from flexemr.errors import ProtocolError

        conn.send_frame(_hello_frame(self.token, conn.conn_id, channel, credits))
        h = conn.recv_header()
        payload = conn.recv_payload(h)
        if h.type == FrameType.ERROR:
            raise ProtocolError(f"server {conn.server} ({conn.address}) refused us: {codec.decode_error(payload)}")
        if h.type != FrameType.HELLO:
            raise ProtocolError(f"server {conn.server} ({conn.address}) answered HELLO with frame type {h.type}")
        hello = codec.decode_hello(payload)
        want = self.expected_shards.get(conn.server)
        if want is not None and channel == "data":
            got = sorted((int(r["table_id"]), int(r["start"]), int(r["end"])) for r in hello.shards)
            exp = sorted((t, a, b) for t, _d, a, b in want)
            if got != exp:
                raise ProtocolError(
                    f"server {conn.server} at {conn.address} ({hello.name}) holds shards {got[:4]}... but this ranker's "
                    f"routing expects {exp[:4]}...: check [embedding].index, servers and routing on that host"
                )

    # ---------------------------------------------------------------- ownership

    def _add(self, conn: Connection, credit_conn: Connection | None = None, inflight: int = 0) -> None:
        st = ConnState(conn, credit_conn)
        st.sent = inflight  # answers the previous owner is still owed arrive here
        with self._conns_changed:
            self.conns[conn.conn_id] = st
            self._conns_changed.notify_all()
        self._selector_op("add", conn.conn_id)

    def _selector_op(self, op: str, conn_id: int, wait: bool = False) -> None:
        done = threading.Event() if wait else None
        with self._sel_lock:
            self._sel_ops.append((op, conn_id, done))
        os.write(self._wake_w, b"x")
        if done is not None and not done.wait(10):
            raise TimeoutError(f"receiver did not release connection {conn_id}")

    def _apply_selector_ops(self) -> None:
        with self._sel_lock:
            ops, self._sel_ops = self._sel_ops, []
        for op, cid, done in ops:
            st = self.conns.get(cid)
            if op == "add" and st is not None:
                self._sel.register(st.conn.fileno(), selectors.EVENT_READ, cid)
            elif op == "remove" and st is not None:
                try:
                    self._sel.unregister(st.conn.fileno())
                except (KeyError, ValueError):
                    pass
            if done is not None:
                done.set()

    # ---------------------------------------------------------------- threads

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._receiver, name="receiver", daemon=True),
            threading.Thread(target=self._handoff_loop, name="handoff", daemon=True),
        ]
        for t in threads:
            t.start()
        if self.shared_locks is not None:
            self.share_connections()
        try:
            self._sender()
        finally:
            self.stop.set()
            os.write(self._wake_w, b"x")
            for t in threads:
                t.join(2)
            for st in list(self.conns.values()):
                st.conn.close()
            self._handoff.close()

    def _sender(self) -> None:
        last_pub = 0.0
        # In-band credits need a short wait so grants never sit idle for long;
        # the priority mode sends them from the receiver and can sleep deeply.
        wait_s = 0.001 if self.credit_mode == "inband" else 0.2
        while True:
            msg = self.sub.read(timeout=wait_s)
            if self.credit_mode == "inband":
                self._flush_inband(exclude=None if msg is None else em.PREFIX.unpack_from(msg.data, 0)[0])
            now = time.monotonic()
            if now - last_pub > 0.1:
                self.publish(self)
                last_pub = now
            if msg is None:
                if self.stop.is_set():
                    return
                continue
            kind = msg.kind
            data = msg.data
            cid, arg = em.PREFIX.unpack_from(data, 0)
            try:
                if kind == em.SUB_FRAME:
                    self._send(cid, data[em.PREFIX_SIZE :])
                elif kind == em.SUB_MIGRATE:
                    self._migrate_out(cid, arg)
                elif kind == em.SUB_STOP:
                    msg.release()
                    self._drain()
                    return
            finally:
                if kind != em.SUB_STOP:
                    msg.release()

    def _send(self, cid: int, frame: memoryview) -> None:
        if self.shared_locks is not None:
            self._send_shared(cid, frame)
            return
        st = self.conns.get(cid)
        if st is None:
            # The connection is migrating here: its socket arrives shortly.
            with self._conns_changed:
                self._conns_changed.wait_for(lambda: cid in self.conns or self.stop.is_set(), timeout=10)
            st = self.conns.get(cid)
            if st is None:
                self._lost(cid, f"engine {self.id} does not own connection {cid}")
                return
        t0 = time.perf_counter_ns()
        rid = struct.unpack_from("<Q", frame, 16)[0]
        n = st.grants_made - st.grants_sent
        if n and self.credit_mode == "inband":
            # Piggyback: patch flags/aux and the reserved trailer in the ring slot itself.
            st.grants_sent += n
            struct.pack_into("<I", frame, 12, n)  # aux = credits; the flag is already set
            struct.pack_into("<Q", frame, len(frame) - 8, st.grant_ns)
            st.granted += n
        st.sent_at[rid] = t0
        st.sent += 1
        try:
            st.bytes_sent += st.conn.send_frame([frame])
        except OSError as e:
            st.sent -= 1
            st.sent_at.pop(rid, None)
            self._lost(cid, f"send to server {st.conn.server} ({st.conn.address}) failed: {e}")
            return
        self.subrequests += 1
        self.busy_ns += time.perf_counter_ns() - t0

    def _send_shared(self, cid: int, frame: memoryview) -> None:
        st = self.conns.get(cid)
        conn = st.conn if st is not None else self.shared_send.get(cid)
        if conn is None:
            with self._conns_changed:
                self._conns_changed.wait_for(lambda: cid in self.shared_send or cid in self.conns or self.stop.is_set(),
                                             timeout=10)
            st = self.conns.get(cid)
            conn = st.conn if st is not None else self.shared_send.get(cid)
            if conn is None:
                self._lost(cid, f"engine {self.id} has no copy of connection {cid}")
                return
        t0 = time.perf_counter_ns()
        lock = self.shared_locks[cid]
        lock.acquire()
        try:
            conn.send_frame([frame])
        except OSError as e:
            self._lost(cid, f"send on shared connection {cid} failed: {e}")
            return
        finally:
            lock.release()
        self.subrequests += 1
        if st is not None:
            st.sent += 1
        self.busy_ns += time.perf_counter_ns() - t0

    def _flush_inband(self, exclude: int | None) -> None:
        """Send in-band credits that found no lookup to ride on, on the data connection."""
        for cid, st in list(self.conns.items()):
            n = st.grants_made - st.grants_sent
            if n and cid != exclude:
                st.grants_sent += n
                try:
                    st.conn.send_frame(codec.encode_credit(cid, n, st.grant_ns))
                    st.granted += n
                except OSError:
                    pass

    def _grant(self, st: ConnState) -> None:
        """One response slot is free again: give the server its credit back."""
        if self.credit_mode == "priority" and st.credit_conn is not None:
            try:
                st.credit_conn.send_frame(codec.encode_credit(st.conn.conn_id, 1, time.monotonic_ns()))
                st.granted += 1
            except OSError:
                pass
        elif self.credit_mode == "inband":
            if st.grants_made == st.grants_sent:
                st.grant_ns = time.monotonic_ns()
            st.grants_made += 1

    def _drain(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while any(st.inflight for st in self.conns.values()) and time.monotonic() < deadline:
            time.sleep(0.002)

    def _migrate_out(self, cid: int, to_engine: int) -> None:
        """Hand ``cid`` to another engine right away, answers still in flight included.

        The receiver lets go of the socket between two frames, so whatever the
        server sends next is still in the socket and the new owner reads it; the
        inference process matches answers by request id, whichever engine's
        ring they come through.  No waiting for a drain.
        """
        st = self.conns.get(cid)
        if st is None:
            return
        self._selector_op("remove", cid, wait=True)
        with self._conns_changed:
            del self.conns[cid]
        server, _address = self.directory[cid]
        handles = [st.conn.detach()]
        if st.credit_conn is not None:
            handles.append(st.credit_conn.detach())
        try:
            self._send_fds(to_engine, cid, HANDOFF_OWN, handles, inflight=st.inflight)
        finally:
            for h in handles:
                os.close(h)
        logger.info("connection %d (server %d) handed to engine %d with %d subrequests in flight",
                    cid, server, to_engine, st.inflight)
        self.comp.write(em.PREFIX.pack(cid, to_engine), kind=em.COMP_MIGRATED, timeout=10)

    def _handoff_loop(self) -> None:
        while not self.stop.is_set():
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self._handoff, _HANDOFF.size, 4)
            except TimeoutError:
                continue
            except OSError:
                return
            if not fds:
                continue
            cid, server, kind, inflight, address = _HANDOFF.unpack(msg)
            addr = address.rstrip(b"\0").decode()
            conn = self.transport.adopt(fds[0], cid, server, addr)
            if kind == HANDOFF_SHARE:
                with self._conns_changed:
                    self.shared_send[cid] = conn
                    self._conns_changed.notify_all()
                continue
            credit_conn = self.transport.adopt(fds[1], cid, server, addr) if len(fds) > 1 else None
            self._add(conn, credit_conn, inflight=inflight)
            logger.info("adopted connection %d (server %d)", cid, server)

    def _receiver(self) -> None:
        while not self.stop.is_set():
            self.heartbeat()
            events = self._sel.select(timeout=0.2)
            for key, _ in events:
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self._apply_selector_ops()
                    continue
                st = self.conns.get(key.data)
                if st is not None:
                    self._receive_one(st)
            self._apply_selector_ops()

    def _receive_one(self, st: ConnState) -> None:
        conn = st.conn
        try:
            h = conn.recv_header()
        except (ConnectionError, OSError) as e:
            self._unregister_dead(st, f"connection to server {conn.server} ({conn.address}) lost: {e}")
            return
        except Exception as e:  # ProtocolError: the stream is unusable
            self._unregister_dead(st, f"server {conn.server} sent a bad frame: {e}")
            return
        size = em.PREFIX_SIZE + HEADER_SIZE + h.payload_len
        if size > self.comp.max_message:
            # Cannot land in the ring: drain it and answer the batch with an error.
            payload = conn.recv_payload(h)
            del payload
            st.received += 1
            msg = (f"a response of {h.payload_len} bytes from server {conn.server} does not fit the completion ring "
                   f"(max {self.comp.max_message}); raise [ranker].ring_bytes or lower max_batch")
            self.comp.write(em.PREFIX.pack(conn.conn_id, 0), *codec.encode_error(h.request_id, ErrorCode.TOO_LARGE, msg),
                            kind=em.COMP_FRAME, timeout=10)
            return
        slot = None
        while slot is None:
            slot = self.comp.reserve(size, timeout=0.5)
            self.heartbeat()  # waiting on a full ring is not a hang of ours
            if slot is None and self.stop.is_set():
                return
        em.PREFIX.pack_into(slot, 0, conn.conn_id, 0)
        pack_header_into(slot, em.PREFIX_SIZE, h.type, h.request_id, h.payload_len, h.aux, h.flags)
        try:
            conn.recv_payload_into(h, slot[em.PREFIX_SIZE + HEADER_SIZE : size])
        except (ConnectionError, OSError) as e:
            self.comp.cancel()
            self._unregister_dead(st, f"connection to server {conn.server} lost mid-frame: {e}")
            return
        self.comp.commit(size, kind=em.COMP_FRAME)
        if self.initial_credits:
            self._grant(st)
        if h.type != FrameType.CREDIT:
            st.received += 1
            t0 = st.sent_at.pop(h.request_id, None)
            if t0 is not None:
                st.rtt_ns.append(time.perf_counter_ns() - t0)
                if len(st.rtt_ns) > 1024:
                    del st.rtt_ns[:512]
        st.bytes_received += size

    def _unregister_dead(self, st: ConnState, reason: str) -> None:
        try:
            self._sel.unregister(st.conn.fileno())
        except (KeyError, ValueError):
            pass
        logger.error("%s", reason)
        self._lost(st.conn.conn_id, reason)

    def _lost(self, cid: int, reason: str) -> None:
        self.comp.write(em.PREFIX.pack(cid, 0), reason.encode(), kind=em.COMP_LOST, timeout=10)


def _hello_frame(token: str, conn_id: int, channel: str, credits: int) -> list:
    frame = codec.encode_hello(0, codec.ROLE_RANKER, f"{token}/{conn_id}/{channel}")
    # aux of a ranker's HELLO = the credits it grants up front (0: no flow control)
    frame[0] = codec.pack_header(FrameType.HELLO, 0, struct.unpack_from("<Q", frame[0], 24)[0], aux=credits)
    return frame
