"""Several rankers on one embedding server: round-robin pooling, per-ranker books, pruned pools.

What an operator would notice: a ranker with three connections does not get
three times the pooling of a ranker with one; a ranker that goes away leaves
no credit pools behind (and the server's credit counters do not go
backwards); the status segment lists who is connected and disappears with
its owner.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import struct
import threading
import time
import uuid

import pytest

from flexemr import naming
from flexemr.control.block import InstanceNotRunning
from flexemr.control.embedding_status import EmbeddingStatusArea
from flexemr.model.spec import load_spec
from flexemr.reqgen import RequestGenerator
from flexemr.routing.table import RoutingTable
from flexemr.transport.tcp import TcpTransport, parse_address
from flexemr.wire import codec
from flexemr.wire.frame import FrameType, pack_header
from flexemr.wire.stream import FrameReader, send_buffers

from flexemrd.embedding.rankers import FairScheduler, RankerBook
from flexemrd.embedding.server import EmbeddingServer
from flexemrd.embedding.store import EmbeddingStore


# ---------------------------------------------------------------------- pure units


def test_work_is_taken_round_robin_across_rankers_not_in_arrival_order():
    ran: list[str] = []
    sched = FairScheduler(concurrent.futures.ThreadPoolExecutor(1), limit=1)
    for i in range(6):                          # ranker b queues its whole burst first
        sched.push("b", ran.append, f"b{i}")
    for i in range(2):
        sched.push("a", ran.append, f"a{i}")
    sched.push("c", ran.append, "c0")
    order = []
    while (task := sched.pop()) is not None:
        order.append(task[1][0])
    assert order == ["b0", "a0", "c0", "b1", "a1", "b2", "b3", "b4", "b5"]
    assert sched.waiting == 0


def test_dispatch_runs_at_most_limit_tasks_and_skips_work_of_dead_connections():
    pool = concurrent.futures.ThreadPoolExecutor(4)
    gate = threading.Event()
    started: list[int] = []
    sched = FairScheduler(pool, limit=2, skip=lambda n: n < 0)

    def work(n: int) -> None:
        started.append(n)
        gate.wait(10)

    for n in (1, -1, 2, 3):
        sched.push("a", work, n)
    sched.dispatch()
    assert sched.running == 2
    time.sleep(0.2)
    assert sorted(started) == [1, 2]            # -1 skipped, 3 waits for a free worker
    gate.set()
    sched.finished()
    sched.dispatch()
    pool.shutdown(wait=True)
    assert sorted(started) == [1, 2, 3]


def test_a_connections_pool_goes_with_its_last_channel_and_the_ranker_with_its_last_connection():
    book = RankerBook()
    d0, pool0 = book.join("r1", "0", "10.0.0.5:40000")
    c0, same = book.join("r1", "0", "10.0.0.5:40001")
    d1, pool1 = book.join("r1", "1", "10.0.0.5:40002")
    assert same is pool0 and pool1 is not pool0
    pool0.give(5)
    pool1.give(3)
    pool0.take()
    [r] = book.snapshot()
    assert (r["token"], r["address"], r["channels"], r["connections"], r["credits"]) == ("r1", "10.0.0.5", 3, 2, 7)
    book.leave(d0)
    assert "r1/0" in book.pools                 # its credit channel is still open
    book.leave(c0)
    assert set(book.pools) == {"r1/1"}
    assert book.credit_totals()[0] == 8         # what pruned pools received still counts
    book.leave(d1)
    assert book.pools == {} and book.rankers == {} and book.snapshot() == []
    assert book.credit_totals()[0] == 8


# ---------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def world(tiny_model):
    spec = load_spec(tiny_model)
    routing = RoutingTable.build(spec, 1, "tables")
    return spec, EmbeddingStore(str(tiny_model), spec, routing.shards_of(0))


@contextlib.contextmanager
def serving(store: EmbeddingStore, **kw):
    server = EmbeddingServer(store, TcpTransport().listen("127.0.0.1:0"), **kw)
    started = threading.Event()
    t = threading.Thread(target=server.serve_forever, args=(started.set,), daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield server, parse_address(server.address)[1]
    finally:
        server.stop()
        t.join(10)


class Channel:
    """One ranker connection's channel: a raw socket that has said HELLO."""

    def __init__(self, port: int, name: str, credits: int = 0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.reader = FrameReader(self.sock)
        frame = codec.encode_hello(0, codec.ROLE_RANKER, name)
        frame[0] = pack_header(FrameType.HELLO, 0, struct.unpack_from("<Q", frame[0], 24)[0], aux=credits)
        send_buffers(self.sock, frame)
        h, _ = self.reader.read_frame()
        assert h.type == FrameType.HELLO

    def close(self) -> None:
        self.sock.close()


def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_ranker_that_goes_away_leaves_no_pools_and_stats_do_not_go_backwards(world):
    with serving(world[1]) as (server, port):
        chans = [Channel(port, f"old/{c}/{kind}", credits=4 if kind == "data" else 0)
                 for c in range(2) for kind in ("data", "credit")]
        other = Channel(port, "new/0/data", credits=2)
        _until(lambda: len(server.rankers.rankers) == 2)
        assert set(server.rankers.pools) == {"old/0", "old/1", "new/0"}
        before = codec.decode_stats(_stats(other))["credits_received"]
        for ch in chans:
            ch.close()
        _until(lambda: set(server.rankers.pools) == {"new/0"})
        assert set(server.rankers.rankers) == {"new"}
        assert codec.decode_stats(_stats(other))["credits_received"] == before == 10
        other.close()
        _until(lambda: not server.rankers.pools and not server.rankers.rankers)


def _stats(ch: Channel) -> bytes:
    send_buffers(ch.sock, [pack_header(FrameType.STATS, 7, 0)])
    h, payload = ch.reader.read_frame()
    assert h.type == FrameType.STATS_RESP
    return bytes(payload)


def _saturate(port: int, name: str, lookup: list, stop: threading.Event, done: list[int], depth: int = 6) -> None:
    """Keep ``depth`` lookups in flight on one connection until ``stop``; count the answers."""
    ch = Channel(port, name)
    try:
        for rid in range(depth):
            send_buffers(ch.sock, lookup)
        while not stop.is_set():
            h, _ = ch.reader.read_frame()
            assert h.type == FrameType.LOOKUP_RESP, h
            done[0] += 1
            send_buffers(ch.sock, lookup)
    finally:
        ch.close()


def test_two_saturating_rankers_get_equal_shares_whatever_their_connection_counts(world):
    """Ranker a has 1 connection, ranker b 3, each keeps its connections full: first come first
    served would give b about three quarters of the pooling; round-robin gives each about half."""
    spec, store = world
    _, sparse = RequestGenerator(spec, ids_per_bag=20, seed=3).batch(256)
    tids = list(range(len(spec.tables)))
    lookup = codec.encode_lookup(1, 256, tids, [sparse[spec.tables[t].name][1] for t in tids],
                                 [sparse[spec.tables[t].name][0] for t in tids])
    with serving(store, workers=1) as (server, port):
        stop = threading.Event()
        counts = {"a": [[0]], "b": [[0], [0], [0]]}
        threads = [threading.Thread(target=_saturate, args=(port, f"{r}/{i}/data", lookup, stop, c), daemon=True)
                   for r, cs in counts.items() for i, c in enumerate(cs)]
        for t in threads:
            t.start()
        _until(lambda: len(server.rankers.rankers) == 2)
        time.sleep(1.0)                                     # warm up: every connection full
        start = {r["token"]: r["lookups"] for r in server.rankers.snapshot()}
        # 80 lookups served while both saturate (however long that takes on a loaded machine)
        _until(lambda: sum(r["lookups"] for r in server.rankers.snapshot()) - sum(start.values()) >= 80, 120)
        end = {r["token"]: r["lookups"] for r in server.rankers.snapshot()}
        stop.set()
        for t in threads:
            t.join(20)
    a, b = end["a"] - start["a"], end["b"] - start["b"]
    assert abs(a - b) <= 0.2 * max(a, b), f"ranker a (1 connection) pooled {a}, ranker b (3 connections) {b}"


# ---------------------------------------------------------------------- the status segment


def test_the_status_segment_round_trips_documents_and_refuses_a_live_owners_name():
    inst = "t" + uuid.uuid4().hex[:8]
    area = EmbeddingStatusArea.create(inst, n_slots=2, slot_bytes=4096)
    try:
        assert os.path.exists(f"/dev/shm/{naming.embedding_status_name(inst)[1:]}")
        with EmbeddingStatusArea.attach(inst, writable=True) as w:
            w.write(1, {"index": 4, "rankers": [{"token": "r"}]})
            with pytest.raises(ValueError, match="does not fit"):
                w.write(0, {"x": "y" * 5000})
        with EmbeddingStatusArea.attach(inst) as r:
            snap = r.snapshot()
        assert snap["role"] == "embedding" and snap["supervisor_pid"] == os.getpid()
        assert snap["servers"][0] == {"slot": 0, "state": "starting", "rankers": []}
        assert snap["servers"][1]["index"] == 4 and snap["servers"][1]["rankers"] == [{"token": "r"}]
    finally:
        area.unlink()
        area.close()
    assert naming.list_instance_segments(inst) == []
    with pytest.raises(InstanceNotRunning):
        EmbeddingStatusArea.attach(inst)


def test_more_rankers_than_a_slot_holds_are_counted_not_fatal():
    from flexemrd.embedding.rankers import StatusPublisher

    inst = "t" + uuid.uuid4().hex[:8]
    area = EmbeddingStatusArea.create(inst, n_slots=1, slot_bytes=4096)
    try:
        many = [{"token": f"ranker{i:03d}." + "x" * 40} for i in range(200)]
        pub = StatusPublisher(inst, 0, lambda: {"index": 0, "rankers": list(many)})
        pub.maybe_publish()
        pub.close()
        doc = area.read(0)
        assert 0 < len(doc["rankers"]) < 200 and doc["rankers_omitted"] == 200 - len(doc["rankers"])
        assert doc["rankers"][0]["token"].startswith("ranker000")      # the oldest stay listed
    finally:
        area.unlink()
        area.close()


def test_the_embedding_host_screen_fits_100_columns_with_long_tokens_and_ipv6_peers():
    from emrctl.render import render_embedding_status

    now = time.time()
    ranker = {"token": "a-very-long-instance-name-of-32c." + "4194304.abcdef", "address": "fd00:1234:5678::abcd:1",
              "channels": 32, "connections": 16, "since_unix": now - 4000, "lookups": 123456789,
              "errors": 0, "bytes_in": 987654321012, "bytes_out": 123456789012345, "credits": 4096,
              "last_seen_s": 0.4}
    snap = {"instance": "x" * 32, "role": "embedding", "supervisor_pid": 4194304, "uptime_s": 400000.0,
            "servers": [{"slot": 0, "index": 12, "address": "[fd00:1234:5678::abcd:1]:7000", "pid": 4194305,
                         "state": "serving", "lookups": 10**12, "errors": 10**9, "bytes_in": 10**15,
                         "bytes_out": 10**15, "rankers": [ranker]},
                        {"slot": 1, "state": "starting", "rankers": []}]}
    text = render_embedding_status(snap)
    assert all(len(line) <= 100 for line in text.splitlines()), text
    assert "4194304.abcdef" in text and "16/32" in text and "starting" in text
