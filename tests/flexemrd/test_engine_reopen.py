"""Migration by reopening, piece by piece in one process (no fork): drain, reopen, the ranker's switch.

Real rings (a unique instance name per test, unlinked afterwards), real
socketpairs and TCP sockets on loopback; the "server" ends are threads or
the test itself speaking the wire protocol.  Failure modes: a retired
connection closed before its last answer (an answer lost), or never closed
(leaked); answers missing at the deadline dropped silently; a retiring
connection that dies reconnected by the engine that gave it up; a reopened
connection booked as the one it replaces; the ranker routing to the new
engine before its connection is ready, or to the old one after it retired.
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
from flexemr.config import ConfigError, parse_config
from flexemr.ring import Ring
from flexemr.transport.registry import migrates_by_reopening
from flexemr.transport.tcp import TcpConnection, TcpTransport
from flexemr.wire import codec
from flexemr.wire.stream import FrameReader, send_buffers

from flexemrd.engine.completions import CompletionWriter
from flexemrd.engine.connections import ConnState, ConnTable, Connector
from flexemrd.engine.credits import CreditMode
from flexemrd.engine.receiver import Receiver, Wakeup
from flexemrd.engine.reopen import Reopener, Retirer
from flexemrd.inference.submission import Submitter


@pytest.fixture
def comp_ring(instance: str) -> Iterator[Ring]:
    ring = Ring.create(naming.ring_names(instance, 0)[1], 8 << 20)
    yield ring
    ring.unlink()
    ring.close()


def _drain(ring: Ring, want: int, timeout: float = 20.0) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        msg = ring.read(timeout=0.2)
        if msg is not None:
            out.append((msg.kind, bytes(msg.data)))
            msg.release()
    return out


def _answer(server: socket.socket, rid: int) -> None:
    send_buffers(server, codec.encode_lookup_response(rid, np.array([0], np.uint32),
                                                      [np.full((2, 4), float(rid), np.float32)]))


class _OldEngine:
    """The old engine's receiver and retirer on one real connection (a socketpair) owing ``owed`` answers."""

    def __init__(self, ring: Ring, owed: int, drain_timeout_s: float = 10.0) -> None:
        self.now = [0.0]                          # the retirer's clock: the test moves it
        self.table = ConnTable()
        self.wakeup = Wakeup()
        self.writer = CompletionWriter(ring, self.wakeup.wake)
        self.stop = threading.Event()
        self.reconnects: list[int] = []
        self.retirer = Retirer(0, self.table, self.writer, lambda cid, t: self.receiver.release(cid, t),
                               lambda cid: False, self.stop, drain_timeout_s=drain_timeout_s,
                               clock=lambda: self.now[0])
        self.receiver = Receiver(self.table, self.writer, CreditMode(), self.wakeup, self.stop,
                                 on_dead=self._lost)
        a, self.server = socket.socketpair()
        self.conn = TcpConnection(a, 5, server=2, address="pair:5", max_payload=1 << 20)
        self.st = ConnState(self.conn, inflight=owed)
        self.table.add(self.st)
        self.receiver.watch(5)
        self.threads = [threading.Thread(target=self.receiver.run, daemon=True),
                        threading.Thread(target=self.retirer.run, daemon=True)]
        for t in self.threads:
            t.start()

    def _lost(self, cid: int, reason: str) -> None:   # what Engine._lost does first
        if not self.retirer.dead(cid, reason):
            self.reconnects.append(cid)

    def wait_retired(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.retirer.draining() or self.table.retiring:
            assert time.monotonic() < deadline, "the retiring connection was never closed"
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.wakeup.wake()
        for t in self.threads:
            t.join(5)
        self.conn.close()
        self.server.close()


def _peer_closed(server: socket.socket) -> bool:
    server.settimeout(5)
    return server.recv(1) == b""


def test_a_retired_connection_closes_once_its_last_answer_is_in_and_then_reports_the_move(comp_ring):
    old = _OldEngine(comp_ring, owed=3)
    try:
        old.retirer.retire(5, to_engine=1)
        assert old.table.get(5) is None and 5 in old.table.retiring, "no longer owned, still receiving"
        _answer(old.server, 0)
        _answer(old.server, 1)
        time.sleep(0.2)
        assert old.retirer.draining() == [5], "one answer is still owed: it keeps draining"
        _answer(old.server, 2)
        old.wait_retired()
        got = _drain(comp_ring, 4)
        assert [k for k, _ in got] == [em.COMP_FRAME] * 3 + [em.COMP_MIGRATED], "every answer lands before the move"
        assert em.PREFIX.unpack_from(got[-1][1], 0) == (5, 1)
        assert _peer_closed(old.server), "the old connection is closed once drained"
        assert old.retirer.leftovers_total == 0 and old.reconnects == []
    finally:
        old.close()


def test_answers_missing_at_the_drain_deadline_are_reported_lost_naming_the_server(comp_ring):
    old = _OldEngine(comp_ring, owed=2, drain_timeout_s=10.0)
    try:
        old.retirer.retire(5, to_engine=1)
        _answer(old.server, 0)
        deadline = time.monotonic() + 10
        while old.st.received < 1:
            assert time.monotonic() < deadline, "the first answer never landed"
            time.sleep(0.01)
        assert old.retirer.draining() == [5]
        old.now[0] = 10.0                         # the drain deadline passes with one answer missing
        old.wait_retired()
        got = _drain(comp_ring, 4)
        assert [k for k, _ in got] == [em.COMP_FRAME, em.COMP_LOST, em.COMP_CONNECTED, em.COMP_MIGRATED]
        reason = got[1][1][em.PREFIX_SIZE:].decode()
        assert "server 2 (pair:5)" in reason and "1 subrequest unanswered" in reason and "10 s" in reason, reason
        assert old.retirer.leftovers_total == 1
        assert _peer_closed(old.server)
    finally:
        old.close()


def test_a_connection_the_receiver_never_lets_go_of_still_reports_its_leftovers_and_is_not_freed(comp_ring):
    """The receiver stuck elsewhere for good: the answers owed are re-issued, the stream is not freed under it."""
    table = ConnTable()
    writer = CompletionWriter(comp_ring, lambda: None)
    writer.bind_producer()                        # no receiver thread: the test writes what is posted

    def never(cid: int, timeout: float) -> None:
        raise TimeoutError(f"receiver did not release connection {cid}")

    retirer = Retirer(0, table, writer, never, lambda cid: False, threading.Event(), drain_timeout_s=0.0)
    a, server = socket.socketpair()
    st = ConnState(TcpConnection(a, 5, server=2, address="pair:5"), inflight=1)
    table.add(st)
    try:
        retirer.retire(5, to_engine=1)
        assert retirer.step() == [5]
        writer.flush()
        got = _drain(comp_ring, 3)
        assert [k for k, _ in got] == [em.COMP_LOST, em.COMP_CONNECTED, em.COMP_MIGRATED]
        assert "server 2 (pair:5)" in got[0][1][em.PREFIX_SIZE:].decode()
        assert a.fileno() != -1, "not freed while a reader may be inside it"
        retirer.close_all()
        assert a.fileno() == -1, "closed when the engine stops"
    finally:
        a.close()
        server.close()


def test_a_retiring_connection_that_dies_is_reported_and_not_reconnected(comp_ring):
    old = _OldEngine(comp_ring, owed=2)
    try:
        old.retirer.retire(5, to_engine=1)
        old.server.close()                      # the server end goes away mid-drain
        old.wait_retired()
        got = _drain(comp_ring, 3)
        assert [k for k, _ in got] == [em.COMP_LOST, em.COMP_CONNECTED, em.COMP_MIGRATED]
        assert "2 subrequests unanswered" in got[0][1][em.PREFIX_SIZE:].decode()
        assert old.reconnects == [], "it belongs to the new engine now: the old one must not reconnect it"
    finally:
        old.close()


def test_a_receiver_blocked_inside_the_retiring_connection_is_interrupted_before_it_is_closed(comp_ring):
    """What an RDMA stream does: readiness without a whole frame, then nothing more (all answers are in)."""
    old = _OldEngine(comp_ring, owed=0)
    try:
        old.server.sendall(b"\x00" * 5)             # a header's first bytes: the receiver blocks for the rest
        time.sleep(0.3)
        t0 = time.monotonic()
        old.retirer.retire(5, to_engine=1)
        old.wait_retired()
        got = _drain(comp_ring, 1)
        assert [k for k, _ in got] == [em.COMP_MIGRATED]
        assert time.monotonic() - t0 >= 0.9, "it waited for the receiver before interrupting it"
        assert _peer_closed(old.server), "closed once the receiver was out of it"
        assert old.reconnects == [] and old.retirer.leftovers_total == 0
    finally:
        old.close()


class _HelloServer:
    """A TCP server thread answering each connection's HELLO, recording (name, credits)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(s)
            r = FrameReader(s)
            h = r.read_header()
            self.got.append((codec.decode_hello(r.read_payload(h)).name, h.aux))
            send_buffers(s, codec.encode_hello(0, codec.ROLE_EMBEDDING, "emb0", [(0, 4, 0, 10)]))

    def close(self) -> None:
        self.sock.close()
        for s in self.conns:
            s.close()


def test_reopening_waits_for_this_engines_previous_connection_and_books_the_new_one_apart(comp_ring):
    srv = _HelloServer()
    table = ConnTable()
    writer = CompletionWriter(comp_ring, lambda: None)
    writer.bind_producer()
    stop = threading.Event()
    owned: list[ConnState] = []
    connector = Connector(TcpTransport(), "tok", initial_credits=4, credit_channel=True)
    reopener = Reopener(1, connector, {0: (0, srv.address)}, table, lambda st: (table.add(st), owned.append(st)),
                        writer, stop)
    a, b = socket.socketpair()
    table.add(ConnState(TcpConnection(a, 0, 0, srv.address)))
    table.retire(0)                              # its previous connection to 0 still drains here
    t = threading.Thread(target=reopener.open, args=(0,), daemon=True)
    try:
        t.start()
        time.sleep(0.3)
        assert srv.got == [] and owned == [], "no second connection to 0 while the first one drains here"
        table.retired(0)
        t.join(10)
        assert srv.got == [("tok/0.1.1/data", 4), ("tok/0.1.1/credit", 0)], \
            "the new connection says HELLO under its own label, granting its own credits"
        assert [st.conn_id for st in owned] == [0] and table.get(0) is owned[0]
        writer.flush()
        [(kind, data)] = _drain(comp_ring, 1)
        assert kind == em.COMP_OPENED and em.PREFIX.unpack_from(data, 0) == (0, 1)
    finally:
        stop.set()
        for st in owned:
            st.conn.close()
            st.credit_conn.close()
        a.close()
        b.close()
        srv.close()


def test_a_reopen_that_waits_does_not_hold_up_another_connections_reopen(comp_ring):
    """Moves overlap: connection 1 opens while connection 0's reopen still waits for its old drain."""
    srv = _HelloServer()
    table = ConnTable()
    writer = CompletionWriter(comp_ring, lambda: None)
    writer.bind_producer()
    stop = threading.Event()
    owned: list[ConnState] = []
    connector = Connector(TcpTransport(), "tok", initial_credits=4, credit_channel=False)
    reopener = Reopener(1, connector, {0: (0, srv.address), 1: (0, srv.address)}, table,
                        lambda st: (table.add(st), owned.append(st)), writer, stop)
    a, b = socket.socketpair()
    table.add(ConnState(TcpConnection(a, 0, 0, srv.address)))
    table.retire(0)                              # connection 0's previous connection still drains here
    t = threading.Thread(target=reopener.run, daemon=True)
    try:
        t.start()
        reopener.request(0)
        reopener.request(1)
        deadline = time.monotonic() + 10
        while not owned and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [st.conn_id for st in owned] == [1], "connection 1 waited behind connection 0's reopen"
        table.retired(0)
        while len(owned) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(st.conn_id for st in owned) == [0, 1]
        writer.flush()
        got = _drain(comp_ring, 2)
        assert [(k, em.PREFIX.unpack_from(d, 0)) for k, d in got] == [(em.COMP_OPENED, (1, 1)), (em.COMP_OPENED, (0, 1))]
    finally:
        stop.set()
        t.join(10)
        for st in owned:
            st.conn.close()
        a.close()
        b.close()
        srv.close()


def test_a_server_that_cannot_be_reached_fails_the_reopen_naming_it_and_leaves_the_owner(comp_ring):
    dead = socket.create_server(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % dead.getsockname()[1]
    dead.close()                                  # nothing listens there any more
    writer = CompletionWriter(comp_ring, lambda: None)
    writer.bind_producer()
    table = ConnTable()
    reopener = Reopener(1, Connector(TcpTransport(connect_timeout=1.0), "tok", 4, False), {3: (2, address)}, table,
                        table.add, writer, threading.Event(), timeout_s=0.5)
    assert reopener.open(3) is False
    writer.flush()
    [(kind, data)] = _drain(comp_ring, 1)
    assert kind == em.COMP_OPEN_FAILED and em.PREFIX.unpack_from(data, 0) == (3, 1)
    assert f"server 2 ({address})" in data[em.PREFIX_SIZE:].decode()
    assert table.get(3) is None


# ---------------------------------------------------------------- the ranker's switch (inference side)


@pytest.fixture
def sub_rings(instance: str) -> Iterator[list[Ring]]:
    rings = [Ring.create(naming.ring_names(instance, e)[0], 1 << 20) for e in range(2)]
    yield rings
    for r in rings:
        r.unlink()
        r.close()


def _kinds(ring: Ring) -> list[tuple[int, tuple[int, int]]]:
    out = []
    while (msg := ring.read(timeout=0)) is not None:
        out.append((msg.kind, em.PREFIX.unpack_from(msg.data, 0)))
        msg.release()
    return out


def test_the_ranker_routes_to_the_new_engine_only_once_its_connection_is_ready(sub_rings):
    sub = Submitter(sub_rings, {0: (0, "a"), 1: (1, "b")}, {0: 0, 1: 0}, reopen=frozenset({0}))
    frame = [codec.encode_credit(0, 1, 0)[0]]
    assert sub.migrate(0, 1) is True
    assert _kinds(sub_rings[1]) == [(em.SUB_OPEN, (0, 0))], "the new engine is asked to open its own"
    assert sub.owners[0] == 0
    sub.submit(0, frame)
    assert _kinds(sub_rings[0]) == [(em.SUB_FRAME, (0, 0))], "until it is ready the old connection serves"
    assert sub.migrate(0, 1) is True and _kinds(sub_rings[1]) == [], "asking again opens nothing more"
    sub.opened(0, 1)
    sub.submit(0, frame)
    assert _kinds(sub_rings[0]) == [(em.SUB_RETIRE, (0, 1))], "the old engine retires it after its last frame"
    assert _kinds(sub_rings[1]) == [(em.SUB_FRAME, (0, 0))]
    assert sub.owners[0] == 1 and sub.opening == {}
    # Connection 1 is not in the reopen set: it hands off as before (owner first, then SUB_MIGRATE).
    assert sub.migrate(1, 1) is True and sub.owners[1] == 1
    assert _kinds(sub_rings[0]) == [(em.SUB_MIGRATE, (1, 1))]


def test_a_failed_reopen_leaves_the_connection_where_it_was(sub_rings):
    sub = Submitter(sub_rings, {0: (0, "a")}, {0: 0}, reopen=frozenset({0}))
    sub.migrate(0, 1)
    sub.open_failed(0, 1)
    assert sub.owners[0] == 0 and sub.opening == {}
    assert sub.migrate(0, 1) is True, "a later migration asks again"


# ---------------------------------------------------------------- the knob


def test_auto_reopens_exactly_where_the_transport_cannot_move_a_connection():
    assert migrates_by_reopening("auto", "rdma", "10.0.0.1:7000") is True
    assert migrates_by_reopening("auto", "tcp", "10.0.0.1:7000") is False
    assert migrates_by_reopening("auto", "auto", "10.0.0.1:7000") is False        # auto keeps TCP
    assert migrates_by_reopening("auto", "shm", "shm:flexemr.x.shm.s00") is False
    assert migrates_by_reopening("reopen", "tcp", "10.0.0.1:7000") is True
    assert migrates_by_reopening("handoff", "tcp", "10.0.0.1:7000") is False
    with pytest.raises(ValueError, match="unknown migration mode 'move'"):
        migrates_by_reopening("move", "tcp", "10.0.0.1:7000")


@pytest.mark.parametrize("ranker, words", [
    ({"transport": "rdma", "migration": "handoff"}, ["[ranker].migration", "'handoff'", "rdma"]),
    ({"transport": "rdma", "mapping": "shared"}, ["[ranker].mapping", "'shared'", "rdma"]),
    ({"migration": "move"}, ["[ranker].migration", "move"]),
])
def test_settings_that_cannot_move_an_rdma_connection_are_refused_naming_them(ranker, words):
    with pytest.raises(ConfigError) as e:
        parse_config({"daemon": {"role": "ranker"}, "ranker": ranker}, source="t.toml")
    for w in words:
        assert w in str(e.value), str(e.value)


def test_reopen_is_accepted_over_rdma_and_over_tcp():
    for transport in ("rdma", "tcp"):
        cfg = parse_config({"daemon": {"role": "ranker"}, "ranker": {"transport": transport, "migration": "reopen"}},
                           source="t.toml")
        assert cfg.ranker.migration == "reopen"


def test_moving_back_before_the_new_connection_is_ready_cancels_it_and_retires_it_when_it_reports(sub_rings):
    sub = Submitter(sub_rings, {0: (0, "a")}, {0: 0}, reopen=frozenset({0}))
    sub.migrate(0, 1)
    assert _kinds(sub_rings[1]) == [(em.SUB_OPEN, (0, 0))]
    assert sub.migrate(0, 0) is False and sub.opening == {}
    sub.opened(0, 1)                             # engine 1's connection, no longer wanted
    assert sub.owners[0] == 0
    assert _kinds(sub_rings[1]) == [(em.SUB_RETIRE, (0, 0))], "closed again at once: nothing leaks"
    assert _kinds(sub_rings[0]) == []
