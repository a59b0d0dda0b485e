"""The shm Connection pair: frames of every size, wraparound, migration to another process, peer death, cleanup."""

from __future__ import annotations

import multiprocessing as mp
import os
import selectors
import signal
import threading
import time
import uuid

import numpy as np
import pytest

from flexemr import naming
from flexemr.transport import shm
from flexemr.transport.shm import ShmConnection, ShmTransport, server_address
from flexemr.wire.frame import FrameType, pack_header
from flexemrd.engine.handoff import HANDOFF_OWN, send_connection

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def instance():
    name = "u" + uuid.uuid4().hex[:10]
    yield name
    naming.unlink_instance_segments(name)


def _frame(rid: int, payload: bytes) -> list:
    return [pack_header(FrameType.LOOKUP, rid, len(payload)), payload]


def _accept(listener, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = listener.accept()
        if c is not None:
            return c
        time.sleep(0.001)
    raise AssertionError("no connection accepted")


def _pair(instance: str, priority: bool = False):
    t = ShmTransport()
    lst = t.listen(server_address(instance, 0))

    out = {}
    th = threading.Thread(target=lambda: out.setdefault("c", t.connect(lst.address, 7, 0, priority)))
    th.start()
    srv = _accept(lst)
    th.join(5)
    return t, lst, out["c"], srv


def _read_stream_nowait(conn: ShmConnection, n: int, timeout: float = 10.0) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    sel = selectors.DefaultSelector()
    sel.register(conn.fileno(), selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while got < n:
        assert time.monotonic() < deadline, f"stream stalled at {got}/{n} bytes"
        k = conn.recv_nowait(view[got:])
        if k == 0:
            sel.select(0.5)
        got += k
    sel.close()
    return bytes(buf)


def test_frames_of_all_sizes_and_wraparound_both_directions(instance):
    t, lst, cli, srv = _pair(instance)
    try:
        assert isinstance(cli, ShmConnection) and isinstance(srv, ShmConnection)
        rng = np.random.default_rng(0)
        # 0 bytes, odd sizes, slot boundaries, and frames larger than half the ring (split into chunks)
        sizes = [0, 1, 7, 55, 56, 57, 4096, 1 << 20, (9 << 20) + 3, 3, (20 << 20) + 5, 100]
        sizes += [int(s) for s in rng.integers(0, 3 << 20, 16)]  # many: the 16/32 MiB rings wrap
        for rid, n in enumerate(sizes):
            payload = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            # ranker -> server: blocking send, server reads the raw stream without blocking
            # (on its own thread: a frame larger than the ring needs its reader going)
            th = threading.Thread(target=cli.send_frame, args=(_frame(rid, payload),))
            th.start()
            raw = _read_stream_nowait(srv, 32 + n)
            th.join(10)
            assert raw[32:] == payload
            # server -> ranker: non-blocking gathered send, engine reads header + payload into a slot
            views = [memoryview(b).cast("B") for b in _frame(rid, payload)]
            sent = 0
            while sent < 32 + n:
                k = srv.send_nowait(_rest(views, sent))
                sent += k
            h = cli.recv_header()
            assert (h.request_id, h.payload_len) == (rid, n)
            slot = memoryview(bytearray(n))
            cli.recv_payload_into(h, slot)
            assert bytes(slot) == payload
        # the socket is not readable once everything is read (no spurious wake-ups)
        sel = selectors.DefaultSelector()
        sel.register(cli.fileno(), selectors.EVENT_READ)
        assert sel.select(0.05) == []
    finally:
        cli.close(); srv.close(); lst.close()
    assert naming.list_instance_segments(instance) == []


def _rest(views, skip):
    out = []
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        out.append(v[skip:])
        skip = 0
    return out


def test_several_frames_in_one_chunk_are_read_one_by_one(instance):
    t, lst, cli, srv = _pair(instance)
    try:
        views = [memoryview(b).cast("B") for rid in range(5) for b in _frame(rid, bytes([rid]) * (rid * 100))]
        assert srv.send_nowait(views) == sum(len(v) for v in views)
        for rid in range(5):
            h = cli.recv_header()
            assert h.request_id == rid
            assert bytes(cli.recv_payload(h)) == bytes([rid]) * (rid * 100)
    finally:
        cli.close(); srv.close(); lst.close()


def _adopt_and_read(instance: str, q) -> None:
    from flexemrd.engine.handoff import HandoffReceiver

    rx = HandoffReceiver(instance, 1)
    q.put("bound")
    h = rx.receive(timeout=60)
    conn = ShmTransport().adopt(h.fds[0], h.conn_id, h.server, h.address)
    out = []
    for _ in range(3):
        h = conn.recv_header()
        out.append((h.request_id, bytes(conn.recv_payload(h))))
    conn.send_frame(_frame(99, b"from the new owner"))
    q.put(out)
    conn.close()


def test_detach_mid_chunk_resumes_in_another_process(instance):
    """Migration: the adopting process reads on from the exact frame the previous owner stopped at."""
    t, lst, cli, srv = _pair(instance)
    try:
        views = [memoryview(b).cast("B") for rid in range(4) for b in _frame(rid, b"p%d" % rid)]
        srv.send_nowait(views)          # four frames in one chunk
        h = cli.recv_header()
        assert bytes(cli.recv_payload(h)) == b"p0"
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_adopt_and_read, args=(instance, q))
        p.start()
        assert q.get(timeout=60) == "bound"
        fd = cli.detach()
        send_connection(instance, 1, 7, 0, cli.address, HANDOFF_OWN, [fd])   # SCM_RIGHTS, as engines do
        os.close(fd)
        assert q.get(timeout=60) == [(1, b"p1"), (2, b"p2"), (3, b"p3")]
        raw = _read_stream_nowait(srv, 32 + len(b"from the new owner"))
        assert raw.endswith(b"from the new owner")
        p.join(30)
    finally:
        srv.close(); lst.close()


def _serve_then_hang(instance: str, ready) -> None:
    lst = ShmTransport().listen(server_address(instance, 0))
    ready.set()
    conns = []
    while True:
        c = lst.accept()
        if c is not None:
            conns.append(c)
        time.sleep(0.001)


def test_killed_server_is_noticed_by_a_blocked_reader_and_sweep_cleans_up(instance):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_serve_then_hang, args=(instance, ready), daemon=True)
    p.start()
    assert ready.wait(60)
    cli = ShmTransport().connect(server_address(instance, 0), 1, 0)
    assert any(".req" in e for e in naming.list_instance_segments(instance))
    os.kill(p.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        cli.recv_header()
    assert time.monotonic() - t0 < 5
    # a blocking send on a full ring notices too
    with pytest.raises(ConnectionError):
        for _ in range(100):
            cli.send_frame(_frame(1, bytes(4 << 20)))
    cli.close()
    p.join(10)
    # the rings of a killed server stay until a sweep: a restarted server's listener does it
    lst = ShmTransport().listen(server_address(instance, 0))
    lst.close()
    assert naming.list_instance_segments(instance) == []


def test_refuses_peers_it_did_not_name(instance):
    import socket

    lst = ShmTransport().listen(server_address(instance, 0))
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(b"\0" + lst.address[len(shm.ADDRESS_PREFIX):].encode())   # unbound: no ring name
        time.sleep(0.05)
        assert lst.accept() is None
        assert s.recv(1) == b""
        s.close()
    finally:
        lst.close()
    assert naming.list_instance_segments(instance) == []


def test_a_connection_migrated_on_before_reading_keeps_the_resume_point(instance):
    """Engine A reads one frame of a chunk, B adopts and hands on at once, C must still start at frame 1."""
    t, lst, cli, srv = _pair(instance)
    try:
        views = [memoryview(b).cast("B") for rid in range(3) for b in _frame(rid, b"q%d" % rid)]
        srv.send_nowait(views)
        h = cli.recv_header()
        assert bytes(cli.recv_payload(h)) == b"q0"
        b = t.adopt(cli.detach(), 7, 0, cli.address)
        c = t.adopt(b.detach(), 7, 0, cli.address)
        got = []
        for _ in range(2):
            h = c.recv_header()
            got.append((h.request_id, bytes(c.recv_payload(h))))
        assert got == [(1, b"q1"), (2, b"q2")]
        c.close()
    finally:
        srv.close(); lst.close()
