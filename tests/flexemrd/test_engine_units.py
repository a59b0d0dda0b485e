"""The engine's pieces in one process, no fork: completion writer, receiver, credits, hand-off, HELLO.

Real rings (a unique instance name per test, unlinked afterwards), real
socketpairs and TCP sockets on loopback; the "server" ends are threads
speaking the wire protocol.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from flexemr import enginemsg as em
from flexemr import naming
from flexemr.errors import ProtocolError
from flexemr.ring import Ring
from flexemr.transport.tcp import TcpConnection, TcpTransport
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, FrameType, unpack_header
from flexemr.wire.stream import FrameReader, send_buffers

from flexemrd.engine.completions import CompletionWriter
from flexemrd.engine.connections import ConnState, ConnTable, Connector
from flexemrd.engine.credits import CreditMode, InbandCredits, PriorityCredits, credit_mode
from flexemrd.engine.handoff import HANDOFF_OWN, HandoffReceiver, send_connection
from flexemrd.engine.receiver import Receiver, Wakeup
from flexemrd.engine.stats import EngineStatsView


@pytest.fixture
def comp_ring(instance: str) -> Iterator[Ring]:
    ring = Ring.create(naming.ring_names(instance, 0)[1], 8 << 20)
    yield ring
    ring.unlink()
    ring.close()


def _pair(cid: int = 0) -> tuple[TcpConnection, socket.socket]:
    """An engine-side connection and the raw "server" end of a socketpair."""
    a, b = socket.socketpair()
    return TcpConnection(a, cid, server=cid, address=f"pair:{cid}", max_payload=1 << 30), b


def _drain(ring: Ring, want: int, timeout: float = 20.0) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        msg = ring.read(timeout=0.2)
        if msg is not None:
            out.append((msg.kind, bytes(msg.data)))
            msg.release()
    return out


# ---------------------------------------------------------------- completion ring: one producer


def test_only_the_producer_thread_may_write_the_completion_ring(comp_ring):
    writer = CompletionWriter(comp_ring, wake=lambda: None)
    writer.bind_producer()
    errors: list[str] = []

    def intruder() -> None:
        try:
            writer.flush()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=intruder, name="sender")
    t.start()
    t.join()
    assert errors and "single producer" in errors[0] and "post_" in errors[0]
    assert comp_ring.depth() == 0


def test_messages_posted_from_other_threads_land_in_order_between_large_frames(comp_ring):
    """The receiver lands 1 MiB responses while two other threads post; nothing collides or reorders."""
    table = ConnTable()
    wakeup = Wakeup()
    writer = CompletionWriter(comp_ring, wakeup.wake)
    stop = threading.Event()
    receiver = Receiver(table, writer, CreditMode(), wakeup, stop)
    conn, server = _pair(cid=7)
    table.add(ConnState(conn))
    receiver.watch(7)
    rx = threading.Thread(target=receiver.run, name="receiver", daemon=True)
    rx.start()
    n_frames, n_posts = 24, 200
    pooled = [np.full((1024, 256), float(i), dtype=np.float32) for i in range(n_frames)]

    def serve() -> None:
        for i in range(n_frames):
            send_buffers(server, codec.encode_lookup_response(i, np.array([0], np.uint32), [pooled[i]]))

    def post(who: int) -> None:
        for k in range(n_posts):
            if who == 0:
                writer.post_migrated(100 + k, who)
            else:
                writer.post_lost(100 + k, f"lost {k}")

    threads = [threading.Thread(target=serve)] + [threading.Thread(target=post, args=(w,)) for w in (0, 1)]
    try:
        for t in threads:
            t.start()
        got = _drain(comp_ring, n_frames + 2 * n_posts)
    finally:
        stop.set()
        wakeup.wake()
        rx.join(5)
        for t in threads:
            t.join(5)
        conn.close()
        server.close()
    frames = [d for k, d in got if k == em.COMP_FRAME]
    migrated = [em.PREFIX.unpack_from(d, 0) for k, d in got if k == em.COMP_MIGRATED]
    lost = [(em.PREFIX.unpack_from(d, 0)[0], d[em.PREFIX_SIZE:].decode()) for k, d in got if k == em.COMP_LOST]
    assert len(frames) == n_frames
    for i, d in enumerate(frames):
        assert em.PREFIX.unpack_from(d, 0) == (7, 0)
        h = unpack_header(d[em.PREFIX_SIZE:em.PREFIX_SIZE + HEADER_SIZE])
        assert h.request_id == i, "frames keep the order they arrived in"
        _tids, (part,) = codec.decode_lookup_response(d[em.PREFIX_SIZE + HEADER_SIZE:])
        np.testing.assert_array_equal(part, pooled[i])
    assert migrated == [(100 + k, 0) for k in range(n_posts)], "each poster's messages arrive once, in order"
    assert lost == [(100 + k, f"lost {k}") for k in range(n_posts)]
    assert receiver.completions.pending() == 0


def test_a_connection_released_by_the_receiver_is_not_read_again(comp_ring):
    table = ConnTable()
    wakeup = Wakeup()
    stop = threading.Event()
    receiver = Receiver(table, CompletionWriter(comp_ring, wakeup.wake), CreditMode(), wakeup, stop)
    conn, server = _pair(cid=3)
    table.add(ConnState(conn))
    receiver.watch(3)
    rx = threading.Thread(target=receiver.run, daemon=True)
    rx.start()
    try:
        send_buffers(server, codec.encode_credit(3, 1, 0))
        assert len(_drain(comp_ring, 1)) == 1
        receiver.release(3)
        send_buffers(server, codec.encode_credit(3, 1, 0))  # waits in the socket for the next owner
        time.sleep(0.3)
        assert comp_ring.depth() == 0
        assert conn.recv_header().type == FrameType.CREDIT, "the unread frame is still in the socket"
    finally:
        stop.set()
        wakeup.wake()
        rx.join(5)
        conn.close()
        server.close()


# ---------------------------------------------------------------- credit strategies


def _lookup_frame(trailer: bool) -> bytearray:
    parts = codec.encode_lookup(42, 2, [0], [np.array([1, 2], np.int32)], [np.array([5, 6, 7], np.int64)],
                                credit_trailer=trailer)
    return bytearray(b"".join(bytes(memoryview(p).cast("B")) for p in parts))


def test_credit_modes_are_chosen_by_name_and_bad_names_are_refused():
    assert credit_mode("off", 4).initial == 0
    assert isinstance(credit_mode("priority", 4), PriorityCredits) and credit_mode("priority", 4).credit_channel
    inband = credit_mode("inband", 3)
    assert isinstance(inband, InbandCredits) and inband.initial == 3 and not inband.credit_channel
    with pytest.raises(ValueError, match="unknown credit mode 'bogus'.*off, priority, inband"):
        credit_mode("bogus", 4)
    with pytest.raises(ValueError, match="credits_per_connection"):
        credit_mode("inband", 0)


def test_inband_credits_ride_on_the_next_lookup_and_not_on_a_fetch():
    conn, server = _pair()
    try:
        st = ConnState(conn)
        mode = InbandCredits(4)
        for _ in range(3):
            mode.on_response(st)
        fetch = bytearray(b"".join(bytes(memoryview(p).cast("B")) for p in codec.encode_fetch(1, 0, np.arange(3))))
        before = bytes(fetch)
        mode.before_send(st, memoryview(fetch))
        assert bytes(fetch) == before, "a frame without the trailer is left alone"
        frame = _lookup_frame(trailer=True)
        mode.before_send(st, memoryview(frame))
        h = unpack_header(frame[:HEADER_SIZE])
        payload = memoryview(frame)[HEADER_SIZE:]
        assert h.aux == 3 and codec.inband_grant_ns(payload) == st.grant_ns > 0
        req = codec.decode_lookup(payload, h.flags)
        assert req.kjt.values.tolist() == [5, 6, 7], "the lookup itself is unchanged"
        assert st.granted == 3 and st.grants_made == st.grants_sent
        mode.on_response(st)  # nothing to ride on: flushed as a CREDIT frame on the data socket
        table = ConnTable()
        table.add(st)
        mode.flush(table, exclude=None)
        reader = FrameReader(server)
        h = reader.read_header()
        assert (h.type, h.aux, h.request_id) == (FrameType.CREDIT, 1, 0)
        assert st.granted == 4
    finally:
        conn.close()
        server.close()


def test_set_inband_credit_refuses_a_frame_without_its_trailer():
    with pytest.raises(ValueError, match="credit_trailer=True"):
        codec.set_inband_credit(memoryview(_lookup_frame(trailer=False)), 1, 1)


def test_priority_credits_go_out_on_the_credit_channel_one_per_response():
    conn, server = _pair(cid=5)
    cconn, cserver = _pair(cid=5)
    try:
        st = ConnState(conn, cconn)
        mode = PriorityCredits(2)
        mode.on_response(st)
        mode.on_response(st)
        reader = FrameReader(cserver)
        got = []
        for _ in range(2):
            h = reader.read_header()
            assert codec.decode_credit(reader.read_payload(h)) > 0, "each credit carries its grant time"
            got.append((h.type, h.aux, h.request_id))
        assert got == [(FrameType.CREDIT, 1, 5)] * 2
        assert st.granted == 2
        view = EngineStatsView(0, _table_with(st), _Depth0(), _Counters(), mode.initial)
        snap = view.snapshot()
        assert snap.connections[5].credits == 4 and snap.connections[5].inflight == 0
    finally:
        for s in (conn, cconn):
            s.close()
        server.close()
        cserver.close()


class _Depth0:
    def depth(self) -> int:
        return 0


class _Counters:
    subrequests = 0
    busy_ns = 0


def _table_with(st: ConnState) -> ConnTable:
    t = ConnTable()
    t.add(st)
    return t


# ---------------------------------------------------------------- hand-off


def test_a_live_socket_moves_between_threads_and_keeps_its_unread_bytes(instance):
    rx = HandoffReceiver(instance, 1)
    a, peer = socket.socketpair()
    try:
        peer.sendall(b"already in flight")
        sent = threading.Thread(target=send_connection,
                                args=(instance, 1, 9, 2, "127.0.0.1:9999", HANDOFF_OWN, [a.fileno()], 3))
        sent.start()
        h = rx.receive(timeout=5)
        sent.join(5)
        assert h is not None
        assert (h.conn_id, h.server, h.kind, h.inflight, h.address) == (9, 2, HANDOFF_OWN, 3, "127.0.0.1:9999")
        a.close()  # the sender's copy goes; the received descriptor keeps the socket alive
        adopted = socket.socket(fileno=h.fds[0])
        with adopted:
            assert adopted.recv(64) == b"already in flight"
            adopted.sendall(b"from the new owner")
            assert peer.recv(64) == b"from the new owner"
    finally:
        rx.close()
        peer.close()


def test_handing_to_an_engine_that_is_not_there_fails_with_a_clear_error(instance):
    a, b = socket.socketpair()
    with a, b, pytest.raises(ConnectionRefusedError, match="engine 5 .* did not take connection 1"):
        send_connection(instance, 5, 1, 0, "127.0.0.1:1", HANDOFF_OWN, [a.fileno()], timeout=0.2)


# ---------------------------------------------------------------- HELLO and the shard check


class _HelloServer:
    """A TCP server thread that answers one HELLO per connection with ``shards``, recording what it got."""

    def __init__(self, shards, refuse: str | None = None) -> None:
        self.shards = shards
        self.refuse = refuse
        self.got: list[tuple[str, int]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            with s:
                r = FrameReader(s)
                h = r.read_header()
                self.got.append((codec.decode_hello(r.read_payload(h)).name, h.aux))
                if self.refuse:
                    send_buffers(s, codec.encode_error(0, 1, self.refuse))
                else:
                    send_buffers(s, codec.encode_hello(0, codec.ROLE_EMBEDDING, "emb0", self.shards))

    def close(self) -> None:
        self.sock.close()


def test_hello_passes_when_the_server_holds_what_routing_expects_and_grants_credits():
    srv = _HelloServer([(0, 16, 0, 100), (1, 8, 50, 70)])
    try:
        c = Connector(TcpTransport(), "tok", initial_credits=4, credit_channel=True,
                      expected_shards={0: [(1, 8, 50, 70), (0, 16, 0, 100)]})
        st = c.open(3, 0, srv.address)
        st.conn.close()
        st.credit_conn.close()
        assert srv.got == [("tok/3/data", 4), ("tok/3/credit", 0)]
    finally:
        srv.close()


def test_hello_fails_naming_the_server_when_its_shards_differ_from_routing():
    srv = _HelloServer([(0, 16, 0, 90)])
    try:
        c = Connector(TcpTransport(), "tok", 0, False, expected_shards={0: [(0, 16, 0, 100)]})
        with pytest.raises(ProtocolError, match=r"server 0 at 127\.0\.0\.1:\d+ \(emb0\) holds shards \[\(0, 0, 90\)\]"
                                                r".*routing expects \[\(0, 0, 100\)\]"):
            c.open(0, 0, srv.address)
    finally:
        srv.close()


def test_a_server_refusing_the_hello_is_reported_with_its_reason():
    srv = _HelloServer([], refuse="unknown ranker token")
    try:
        with pytest.raises(ProtocolError, match="refused us: unknown ranker token"):
            Connector(TcpTransport(), "tok", 0, False).open(0, 0, srv.address)
    finally:
        srv.close()
