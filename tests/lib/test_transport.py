"""The transport's two ends over real loopback sockets, the incremental frame reader, the registry.

A listener hands out connections that speak the same frames as the ranker's
end, blocking or not; a connection survives detach/adopt mid-stream; the
non-blocking calls never wait; the frame assembler allocates only for bytes
that arrived; and the package has no import loop.
"""

from __future__ import annotations

import ast
import logging
import socket
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from flexemr.errors import ProtocolError
from flexemr.transport import Listener, select_transport
from flexemr.transport.base import Connection
from flexemr.transport.tcp import DSCP_EF_TOS, PRIORITY_SO, TcpTransport
from flexemr.transport.verbs import RdmaTransport
from flexemr.wire import codec
from flexemr.wire.frame import FrameType, pack_header
from flexemr.wire.stream import FrameAssembler, Oversized

TRANSPORT_DIR = Path(__file__).resolve().parents[2] / "lib" / "flexemr" / "transport"


@pytest.fixture
def pair():
    """(listener, ranker-side connection, server-side connection) on loopback."""
    t = TcpTransport()
    listener = t.listen("127.0.0.1:0")
    client = t.connect(listener.address, conn_id=7, server=2)
    server = None
    for _ in range(200):
        server = listener.accept()
        if server is not None:
            break
        time.sleep(0.01)  # accept() itself never waits
    assert server is not None
    yield listener, client, server
    client.close()
    server.close()
    listener.close()


def _frame(rid: int, n: int = 3) -> list:
    return codec.encode_fetch_response(rid, 1, np.arange(n * 4, dtype=np.float32).reshape(n, 4))


def test_listener_accepts_without_waiting_and_names_both_ends():
    listener = TcpTransport().listen("127.0.0.1:0")
    try:
        assert isinstance(listener, Listener)
        assert listener.accept() is None, "accept() must return None when nobody is connecting"
        assert listener.address.startswith("127.0.0.1:") and int(listener.address.rsplit(":", 1)[1]) > 0
    finally:
        listener.close()
        listener.close()  # idempotent


def test_frames_flow_both_ways_between_the_two_ends(pair):
    _listener, client, server = pair
    assert isinstance(server, Connection) and (client.conn_id, client.server) == (7, 2)
    assert server.peer.startswith("127.0.0.1:") and client.peer == client.address
    for conn in (client, server):
        s = socket.socket(fileno=conn.fileno())
        try:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            s.detach()
    client.send_frame(_frame(1))
    h = server.recv_header()
    assert (h.type, h.request_id) == (FrameType.FETCH_RESP, 1)
    tid, rows = codec.decode_fetch_response(server.recv_payload(h))
    assert tid == 1 and rows.shape == (3, 4)
    server.send_frame(_frame(2, n=5))
    h = client.recv_header()
    buf = memoryview(bytearray(h.payload_len + 100))
    client.recv_payload_into(h, buf)
    np.testing.assert_array_equal(codec.decode_fetch_response(buf[: h.payload_len])[1].ravel(), np.arange(20))


def test_priority_connection_is_marked_for_the_queueing_discipline():
    t = TcpTransport()
    listener = t.listen("127.0.0.1:0")
    conn = t.connect(listener.address, 1, 0, priority=True)
    try:
        s = socket.socket(fileno=conn.fileno())
        try:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == PRIORITY_SO
            assert s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == DSCP_EF_TOS
        finally:
            s.detach()
    finally:
        conn.close()
        listener.close()


def test_non_blocking_calls_never_wait(pair):
    _listener, client, server = pair
    assert server.recv_nowait(memoryview(bytearray(10))) == 0
    # Fill the kernel's buffers: send_nowait must report 0 instead of blocking.
    chunk = [memoryview(bytearray(1 << 20))]
    sent = 0
    for _ in range(200):
        n = client.send_nowait(chunk)
        if n == 0:
            break
        sent += n
    else:
        pytest.fail("send_nowait never reported a full buffer")
    assert sent > 0
    got, view = 0, memoryview(bytearray(1 << 16))
    while got < sent:
        got += server.recv_nowait(view) or 0
    client.close()
    with pytest.raises(ConnectionError):
        for _ in range(1000):
            server.recv_nowait(view)


def test_a_detached_connection_is_adopted_mid_stream(pair):
    _listener, client, server = pair
    client.send_frame(_frame(1))
    client.send_frame(_frame(2))
    h = server.recv_header()
    server.recv_payload(h)
    adopted = TcpTransport().adopt(server.detach(), 9, 0, "somewhere:1")
    try:
        h = adopted.recv_header()
        assert h.request_id == 2 and adopted.conn_id == 9
        adopted.recv_payload(h)
    finally:
        adopted.close()


def test_a_bad_header_is_a_protocol_error_naming_it(pair):
    _listener, client, server = pair
    client.send_frame([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456"])
    with pytest.raises(ProtocolError, match="bad magic"):
        server.recv_header()


# ------------------------------------------------------------------ the frame assembler


class _Feed:
    """A byte source that hands out at most ``step`` bytes per call, then nothing."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.off, self.step = data, 0, step

    def __call__(self, view: memoryview) -> int:
        k = min(len(view), self.step, len(self.data) - self.off)
        view[:k] = self.data[self.off : self.off + k]
        self.off += k
        return k


def _bytes(frame: list) -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in frame)


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_assembler_yields_the_same_frames_whatever_the_arrival_pattern(step):
    frames = [_frame(1, 1), [pack_header(FrameType.PING, 2, 0)], _frame(3, 40000), _frame(4, 2)]
    feed = _Feed(b"".join(_bytes(f) for f in frames), step)
    asm = FrameAssembler()
    out = []
    while len(out) < len(frames):
        got = asm.next(feed)
        if got is None:
            feed.step = step  # more bytes "arrive"
            continue
        h, payload = got
        out.append((h.request_id, bytes(payload)))
        asm.recycle(payload)
    assert [rid for rid, _ in out] == [1, 2, 3, 4]
    assert [p for _, p in out] == [_bytes(f)[32:] for f in frames]
    assert not asm.mid_frame


def test_assembler_allocates_for_bytes_that_arrived_not_for_the_announced_length():
    feed = _Feed(pack_header(FrameType.LOOKUP, 1, 1 << 30) + bytes(1000), 1 << 20)
    asm = FrameAssembler(max_payload=1 << 30)
    tracemalloc.start()
    try:
        assert asm.next(feed) is None  # 1000 of 2^30 bytes: not complete, and no gigabyte reserved
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak allocation {peak} bytes for a stalled 1 GiB header"
    assert asm.mid_frame


def test_assembler_reports_an_oversized_frame_then_skips_it():
    data = pack_header(FrameType.LOOKUP, 5, 5000) + bytes(5000) + pack_header(FrameType.PING, 6, 0)
    feed = _Feed(data, 1 << 20)
    asm = FrameAssembler(max_payload=100)
    refused = asm.next(feed)
    assert isinstance(refused, Oversized) and refused.request_id == 5 and "5000" in refused.message
    h, payload = asm.next(feed)
    assert (h.type, h.request_id, len(payload)) == (FrameType.PING, 6, 0)


def test_assembler_refuses_an_unreadable_header():
    with pytest.raises(ProtocolError, match="bad magic"):
        FrameAssembler().next(_Feed(b"x" * 32, 32))


# ------------------------------------------------------------------ registry and layering


def test_select_transport_says_which_and_why(caplog):
    caplog.set_level(logging.INFO, logger="flexemr.transport.registry")
    tcp = select_transport("tcp")
    assert isinstance(tcp.net, TcpTransport) and tcp.shm is None
    assert "transport: tcp (configured 'tcp')" in caplog.text
    assert select_transport("auto").name in ("shm+tcp", "shm+rdma")
    with pytest.raises(ValueError, match="is not a shm address.*'shm'"):
        select_transport("shm").connect("127.0.0.1:1", 0, 0)   # never a silent TCP fallback


def test_an_rdma_connection_cannot_move_to_another_engine():
    t = RdmaTransport()  # opens nothing until it connects
    r, w = socket.socketpair()
    with pytest.raises(NotImplementedError, match="queue pair cannot change process.*migrates by reopening"):
        t.adopt(r.detach(), 0, 0, "h:1")
    w.close()
    assert RdmaTransport.MIGRATES is False and TcpTransport.MIGRATES is True   # engines reopen it instead


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_interface_imports_no_implementation_and_nothing_imports_the_registry_back():
    base = _imports(TRANSPORT_DIR / "base.py")
    assert not {m for m in base if m.startswith("flexemr.transport")}, base
    for impl in ("tcp.py", "verbs.py"):
        mods = {m for m in _imports(TRANSPORT_DIR / impl) if m.startswith("flexemr.transport")}
        # verbs builds on tcp (the control channel) and its own verbs layer, never on the registry
        allowed = {"flexemr.transport.base"} | ({"flexemr.transport.tcp"} if impl == "verbs.py" else set())
        assert {m for m in mods if not m.startswith("flexemr.transport.rdma")} <= allowed, (impl, mods)
    for path in TRANSPORT_DIR.glob("*.py"):
        assert not {m for m in _imports(path) if m.startswith(("flexemrd", "flexemr.control", "emrctl"))}, path
