"""The daemon's ``rdma`` Connection: HELLO over TCP carries the blob, then frames move over verbs.

A forked peer plays the embedding server exactly as flexemrd's event loop
does: it accepts TCP, reads the HELLO, upgrades with
``upgrade_server_connection`` and then serves frames non-blocking from a
selector on the connection's ``fileno()`` (FrameAssembler over
``recv_nowait``, replies by ``send_nowait``).  This process is the engine:
``RdmaTransport.connect`` + ``say_hello``, then blocking ``send_frame`` /
``recv_header`` / ``recv_payload_into``.  Frames from 0 bytes to several
ring-fulls, both directions, each checked byte for byte; the bytes crossing
TCP after the HELLO are zero, and the device counted the packets.
"""

from __future__ import annotations

import selectors
import socket
import struct

import numpy as np
import pytest

from tests.rdma.peers import Peer, counter

pytestmark = pytest.mark.rdma

SIZES = [0, 1, 31, 4096, 65535, 65536, 65537, 200_000, 3 << 20, 7, 1 << 20]
_TCP_BYTES = struct.Struct("=QQ")  # tcp_info: tcpi_bytes_acked, tcpi_bytes_received at offset 120


def tcp_bytes(sock: socket.socket) -> tuple[int, int]:
    """(bytes sent and acknowledged, bytes received) of a TCP socket, from the kernel's tcp_info."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return _TCP_BYTES.unpack_from(info, 120)


def echo_server(pipe, frames: int, break_qp: bool) -> None:
    from flexemr.transport.tcp import TcpTransport
    from flexemr.transport.verbs import upgrade_server_connection
    from flexemr.wire import codec
    from flexemr.wire.frame import FrameType
    from flexemr.wire.stream import FrameAssembler

    listener = TcpTransport().listen("127.0.0.1:0")
    pipe.send(listener.address)
    sel = selectors.DefaultSelector()
    sel.register(listener.fileno(), selectors.EVENT_READ)
    sel.select(60)
    tcp = listener.accept()
    assert tcp is not None
    h = tcp.recv_header()
    hello = codec.decode_hello(tcp.recv_payload(h))
    assert h.type == FrameType.HELLO and hello.blob, "the ranker's HELLO must carry a connection blob"
    conn, blob = upgrade_server_connection(tcp, hello.blob)
    tcp.send_frame(codec.encode_hello(h.request_id, codec.ROLE_EMBEDDING, "echo", blob=blob))
    sel.unregister(listener.fileno())
    sel.register(conn.fileno(), selectors.EVENT_READ)
    reader = FrameAssembler(1 << 30)
    echoed = 0

    def serve_until_told() -> object:
        """Echo every frame (and keep pumping what the ranker's ring could not take yet) until the test speaks."""
        nonlocal echoed
        while not pipe.conn.poll(0):
            sel.select(0.05)
            while (got := reader.next(conn.recv_nowait)) is not None:
                fh, payload = got
                sent = conn.send_nowait([memoryview(b).cast("B") for b in codec_frame(fh, payload)])
                assert sent == 32 + fh.payload_len
                echoed += 1
            conn.send_nowait([])   # pushes the backlog as the ranker's grants come back
        return pipe.recv()

    assert serve_until_told() == "stats"
    pipe.send({"echoed": echoed, "qp": conn.stream.state(), "written": conn.stream.bytes_written,
               "tcp": tcp_bytes(conn.tcp.sock)})
    if break_qp:
        assert pipe.recv() == "break"
        conn.stream.to_error()
        pipe.send("broken")
    pipe.recv()
    conn.close()


def codec_frame(h, payload) -> list:
    from flexemr.wire.frame import pack_header

    return [pack_header(h.type, h.request_id, h.payload_len, aux=h.aux), bytes(payload)]


def _hello(conn) -> None:
    from flexemrd.engine.connections import say_hello

    say_hello(conn, "tok", "data", 0)


def test_frames_of_every_size_echo_over_verbs_and_nothing_crosses_tcp(rdma_device: str) -> None:
    from flexemr.transport.verbs import RdmaTransport
    from flexemr.wire.frame import FrameType, pack_header

    rng = np.random.default_rng(1)
    sent0 = counter(rdma_device, "sent_pkts")
    with Peer(echo_server, len(SIZES), False) as peer:
        conn = RdmaTransport(rdma_device).connect(peer.recv(), 1, 0)
        _hello(conn)
        assert conn.transport_name == "rdma" and conn.stream.state() == "RTS"
        tcp0 = tcp_bytes(conn.tcp.sock)
        payloads = [rng.integers(0, 256, n, dtype=np.uint8) for n in SIZES]
        for i, p in enumerate(payloads):
            conn.send_frame([pack_header(FrameType.LOOKUP, i, p.nbytes, aux=i), p])
        for i, p in enumerate(payloads):
            h = conn.recv_header()
            assert (h.request_id, h.payload_len, h.aux) == (i, p.nbytes, i)
            out = np.empty(p.nbytes, np.uint8)
            conn.recv_payload_into(h, memoryview(out))
            np.testing.assert_array_equal(out, p)
        peer.send("stats")
        stats = peer.recv()
        tcp1 = tcp_bytes(conn.tcp.sock)
        peer.send("stop")
        conn.close()
    payload = sum(SIZES) + 32 * len(SIZES)
    assert stats["echoed"] == len(SIZES) and stats["qp"] == "RTS"
    assert stats["written"] == payload and conn.stream is None
    assert tcp1 == tcp0, "no byte may cross TCP after the HELLO"
    assert counter(rdma_device, "sent_pkts") - sent0 >= 2 * payload // 4096


def test_a_broken_queue_pair_is_a_connection_error_naming_the_peer(rdma_device: str) -> None:
    from flexemr.transport.verbs import RdmaTransport
    from flexemr.wire.frame import FrameType, pack_header

    with Peer(echo_server, 1, True) as peer:
        conn = RdmaTransport(rdma_device).connect(peer.recv(), 1, 0)
        _hello(conn)
        conn.send_frame([pack_header(FrameType.LOOKUP, 1, 3), b"abc"])
        h = conn.recv_header()
        conn.recv_payload(h)
        peer.send("stats")
        peer.recv()
        peer.send("break")
        assert peer.recv() == "broken"
        with pytest.raises(ConnectionError, match="127.0.0.1"):
            for i in range(200):  # the peer's QP is in ERR: our writes fail (retries exhausted)
                conn.send_frame([pack_header(FrameType.LOOKUP, i, 4096), bytes(4096)])
                conn.recv_header()
        peer.send("stop")
        conn.close()
