"""Lent ring ranges (zero-copy responses): the bytes are read where they landed, never overwritten early.

A consumer lends a message's payload and releases the message; a borrower in
another process reads it and gives it back.  These tests check what a user of
the shm transport would see go wrong otherwise: a producer overwriting a
partial the ranker is still reading, a producer never woken once space comes
back, returns out of order (a connection handed to another engine) freeing too
much, and a shm connection whose large frames are lent, not copied.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
import uuid

import numpy as np
import pytest

from flexemr import naming
from flexemr.ring import Borrower, Ring
from flexemr.transport.shm import DATA_RESPONSE_RING, ShmTransport, server_address
from flexemr.wire.frame import FrameType, pack_header

pytestmark = pytest.mark.timeout(120)

CAP = 64 << 10
MSG = 12 << 10   # a 12 KiB payload: five fit a 64 KiB ring


@pytest.fixture
def ring():
    name = naming.shm_name("u" + uuid.uuid4().hex[:10], "ring", "lend")
    r = Ring.create(name, CAP, populate=False)
    yield r
    r.unlink()
    r.close()


def _fill(r: Ring, value: int) -> bool:
    slot = r.try_reserve(MSG)
    if slot is None:
        return False
    np.frombuffer(slot, dtype=np.uint8)[:] = value
    r.commit()
    return True


def _lend_next(r: Ring) -> tuple[int, int]:
    msg = r.peek()
    assert msg is not None
    lent = r.lend(msg, 0, MSG)
    msg.release()   # released at once: only the lend keeps the bytes
    return lent


def test_lent_bytes_are_not_reused_until_given_back(ring):
    lends = []
    value = 0
    while _fill(ring, value):
        lends.append((value, *_lend_next(ring)))
        value += 1
    assert len(lends) >= 4
    # the consumer released everything: without lending, the producer would write again now
    assert ring.stats().tail == ring.stats().head
    assert not _fill(ring, 99), "the producer reused bytes that are still lent"
    b = Borrower.attach(ring.name)
    try:
        for v, seq, pos in lends:
            view = b.view(seq, pos, MSG)
            assert view is not None and set(np.frombuffer(view, dtype=np.uint8)) == {v}
        # (the space a return frees ends where the lent range ends, a slot's padding
        # later: give back two so that one whole slot is certainly free)
        for _v, seq, pos in lends[:2]:
            b.give_back(seq, pos + MSG)
        assert not _fill(ring, 99), "returns are published by flush(), not before"
        b.flush()
        assert _fill(ring, 99), "a returned lend frees its space"
        assert b.view(lends[0][1], lends[0][2], MSG) is None, "a returned lend has no view any more"
        assert ring.lends_outstanding() == len(lends) - 2
    finally:
        b.close()


def test_returns_out_of_order_free_only_the_contiguous_prefix(ring):
    lends = []
    while _fill(ring, len(lends)):
        lends.append(_lend_next(ring))
    b = Borrower.attach(ring.name)
    try:
        # the newest lends come back first (another engine's completion ring drained earlier)
        for seq, pos in reversed(lends[1:]):
            b.give_back(seq, pos + MSG)
        b.flush()
        assert not _fill(ring, 7), "lend 0 is still out: nothing may be reused"
        assert b.waiting == len(lends) - 1
        seq, pos = lends[0]
        b.give_back(seq, pos + MSG)
        b.flush()
        assert b.waiting == 0 and ring.lends_outstanding() == 0
        n = 0
        while _fill(ring, 7):
            n += 1
        assert n >= len(lends) - 1, "every lend returned: the ring is free again"
    finally:
        b.close()


def test_a_gap_that_never_closes_is_skipped_after_the_timeout(ring):
    lends = []
    for v in range(3):
        assert _fill(ring, v)
        lends.append(_lend_next(ring))
    b = Borrower.attach(ring.name)
    try:
        b.give_back(lends[2][0], lends[2][1] + MSG)   # lends 0 and 1 were lost with a dead process
        assert b.stale_gap(time.monotonic(), after_s=60) == 0
        assert b.stale_gap(time.monotonic() + 61, after_s=60) == 2
        b.flush()
        assert ring.lends_outstanding() == 0
        assert b.view(lends[0][0], lends[0][1], MSG) is None, "a skipped lend's bytes may be reused: no view"
    finally:
        b.close()


def _borrow_and_return(name: str, lends: list, go, out) -> None:
    b = Borrower.attach(name)
    go.wait(10)
    sums = []
    for seq, pos in lends:
        sums.append(int(np.frombuffer(b.view(seq, pos, MSG), dtype=np.uint8).sum()))
        b.give_back(seq, pos + MSG)
    b.flush()
    out.put(sums)
    b.close()


def test_a_producer_waiting_for_space_is_woken_by_the_borrower_in_another_process(ring):
    lends = []
    while _fill(ring, len(lends) + 1):
        lends.append(_lend_next(ring))
    ctx = mp.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_borrow_and_return, args=(ring.name, lends, go, out))
    p.start()
    got: dict[str, float] = {}

    def produce() -> None:
        t0 = time.monotonic()
        slot = ring.reserve(MSG, timeout=20)   # sleeps on the space doorbell
        got["waited"] = time.monotonic() - t0
        if slot is not None:
            ring.commit()
            got["ok"] = 1.0

    th = threading.Thread(target=produce)
    th.start()
    time.sleep(0.3)
    assert th.is_alive(), "the producer found room while every byte was lent"
    go.set()
    th.join(20)
    p.join(20)
    assert got.get("ok") == 1.0
    assert out.get(timeout=5) == [(i + 1) * MSG for i in range(len(lends))], "the borrower read the exact bytes"


def _frame(rid: int, payload: bytes) -> list:
    return [pack_header(FrameType.LOOKUP_RESP, rid, len(payload)), payload]


@pytest.fixture
def pair():
    """(engine end, server end) of a real shm connection; checks /dev/shm is clean afterwards."""
    instance = "u" + uuid.uuid4().hex[:10]
    t = ShmTransport()
    lst = t.listen(server_address(instance, 0))
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("c", t.connect(lst.address, 7, 0)))
    th.start()
    deadline = time.monotonic() + 5
    srv = None
    while srv is None and time.monotonic() < deadline:
        srv = lst.accept()
        time.sleep(0.001)
    th.join(5)
    yield box["c"], srv
    box["c"].close()
    srv.close()
    lst.close()
    assert naming.list_instance_segments(instance) == [], "the server unlinks its rings on close"
    naming.unlink_instance_segments(instance)


def test_a_borrower_that_stops_returning_bounds_the_ring_and_nobody_blocks(pair):
    """A ranker that stops consuming: the server's writes stop at the ring's size (bounded memory),
    and once the lends come back everything flows again, exact and in order."""
    eng, srv = pair
    frame = 1 << 20
    payloads = [bytes([i % 251]) * frame for i in range(64)]   # 64 MiB: twice the response ring
    sent: list[int] = []

    def serve() -> None:
        for i, p in enumerate(payloads):
            srv.send_frame(_frame(i, p))
            sent.append(i)

    lents: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        for _ in payloads:
            h = eng.recv_header()
            lent = eng.lend_payload(h)
            lents.put((h.request_id, lent if lent is not None else bytes(eng.recv_payload(h))))

    threads = [threading.Thread(target=serve), threading.Thread(target=receive)]
    for th in threads:
        th.start()
    time.sleep(1.5)   # the ranker is stalled: nothing is given back
    assert len(sent) < len(payloads), "the server wrote more than the ring holds while nothing was returned"
    held = eng._rx.lends_outstanding() * frame
    assert 0 < held <= DATA_RESPONSE_RING
    got = []
    borrower = None
    while len(got) < len(payloads):
        rid, lent = lents.get(timeout=30)
        if isinstance(lent, bytes):
            got.append(lent)   # a frame split across chunks is copied, as before
            continue
        borrower = borrower or Borrower.attach(lent.ring)
        got.append(bytes(borrower.view(lent.seq, lent.pos, lent.nbytes)))
        borrower.give_back(lent.seq, lent.pos + lent.nbytes)
        borrower.flush()
    for th in threads:
        th.join(30)
    assert got == payloads
    assert eng._rx.lends_outstanding() == 0
    assert eng._rx.lent_bytes() >= 0.9 * len(payloads) * frame, "nearly every payload was lent, not copied"
    borrower.close()


def test_shm_connection_lends_large_payloads_and_a_borrower_reads_them_exactly(pair):
    eng, srv = pair
    payloads = [bytes([i]) * (5000 + 1000 * i) for i in range(8)]
    views = [memoryview(b).cast("B") for p in payloads for b in _frame(len(payloads), p)]
    while views:   # the server's event loop: as much as fits, frames gathered into chunks
        n = srv.send_nowait(views)
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    borrower = None
    for p in payloads:
        h = eng.recv_header()
        lent = eng.lend_payload(h)
        assert lent is not None, "a payload inside one chunk is lent, not copied"
        assert lent.nbytes == len(p) == h.payload_len
        borrower = borrower or Borrower.attach(lent.ring)
        assert borrower.ino == lent.ino
        assert bytes(borrower.view(lent.seq, lent.pos, lent.nbytes)) == p
        borrower.give_back(lent.seq, lent.pos + lent.nbytes)
    borrower.flush()
    assert eng._rx.lends_outstanding() == 0
    assert eng._rx.lent_bytes() == sum(map(len, payloads))
    borrower.close()


def _adopt_and_lend(instance: str, q, back) -> None:
    from flexemrd.engine.handoff import HandoffReceiver

    rx = HandoffReceiver(instance, 1)
    q.put("bound")
    h = rx.receive(timeout=60)
    conn = ShmTransport().adopt(h.fds[0], h.conn_id, h.server, h.address)
    out = []
    for _ in range(2):
        hdr = conn.recv_header()
        out.append(conn.lend_payload(hdr))
    q.put(out)
    back.get(timeout=60)   # stay up (holding the connection) until the test is done
    conn.close()


def test_lends_of_a_handed_over_connection_stay_valid_and_may_come_back_out_of_order(instance):
    """Hand-off: the old engine lent frame 0, the adopting process lends frames 1-2 (its lend numbers
    continue the ring's); the ranker sees the new engine's references first.  Every partial reads
    exactly, and the server gets the space only when the old engine's lend is back too."""
    from flexemrd.engine.handoff import HANDOFF_OWN, send_connection

    t = ShmTransport()
    lst = t.listen(server_address(instance, 0))
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("c", t.connect(lst.address, 7, 0)))
    th.start()
    srv = None
    deadline = time.monotonic() + 5
    while srv is None and time.monotonic() < deadline:
        srv = lst.accept()
        time.sleep(0.001)
    th.join(5)
    eng = box["c"]
    ctx = mp.get_context("spawn")
    q, back = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_adopt_and_lend, args=(instance, q, back))
    try:
        payloads = [bytes([i + 1]) * (6 << 20) for i in range(3)]   # 18 MiB: more than half the 32 MiB ring
        for i, pl in enumerate(payloads):
            srv.send_frame(_frame(i, pl))
        h = eng.recv_header()
        first = eng.lend_payload(h)
        assert first is not None and first.seq == 0
        p.start()
        assert q.get(timeout=60) == "bound"
        fd = eng.detach()
        send_connection(instance, 1, 7, 0, eng.address, HANDOFF_OWN, [fd])
        os.close(fd)
        later = q.get(timeout=60)
        assert [x.seq for x in later] == [1, 2], "lend numbers continue in the adopting process"
        b = Borrower.attach(first.ring)
        for x, pl in zip([first, *later], payloads):
            assert bytes(b.view(x.seq, x.pos, x.nbytes)) == pl
        for x in later:   # the new engine's completion ring was drained first
            b.give_back(x.seq, x.pos + x.nbytes)
        b.flush()
        assert b.waiting == 2
        rsp = srv._tx   # the server's end of the response ring
        head = rsp.stats().head
        assert rsp.stats().tail == head, "both engines read everything"
        assert rsp.reclaim_tail() <= first.pos, "lend 0 is still out: the server may not reuse its bytes"
        b.give_back(first.seq, first.pos + first.nbytes)
        b.flush()
        assert b.waiting == 0 and b.ring.lends_outstanding() == 0
        assert rsp.reclaim_tail() == head, "all three back: the whole ring is the server's again"
        b.close()
    finally:
        back.put("done")
        p.join(30)
        srv.close()
        lst.close()
