"""Three real embedding server processes on loopback, driven the way a ranker drives them.

Model: the ``tiny`` preset (4 tables of 1001/2003/517/4099 rows, sum/mean/max/sum),
cut by rows over 3 servers, so every non-empty bag fans out to every server
and comes back as three partials that the test combines.  Every answer is
compared with ``pool_reference`` over the whole table.  Bad requests must be
answered with an ERROR frame carrying the right code, after which the same
connection keeps serving; only an unreadable header closes a connection,
and never the process.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables
from flexemr.pooling import pool_reference
from flexemr.reqgen import RequestGenerator
from flexemr.routing import RoutingTable, split_batch
from flexemr.routing.combine import combine_compact
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, VERSION, ErrorCode, FrameType, pack_header
from flexemr.wire.stream import FrameReader, send_buffers

N_SERVERS = 3
MAX_PAYLOAD = 1 << 20  # small, so "oversized" is cheap to send
HELPER = Path(__file__).with_name("_embedding_proc.py")
REPO = Path(__file__).resolve().parents[2]


class Servers:
    """Embedding server processes; ``stop()`` sends SIGTERM and waits, killing stragglers.

    ``placements`` lists (index, n_servers, strategy) per process; all start at
    once, so their interpreter and torch start-ups overlap.
    """

    def __init__(self, model: Path, logdir: Path, placements: list[tuple[int, int, str]]) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.ports: list[int] = []
        try:
            for k, (i, n, strategy) in enumerate(placements):
                log = logdir / f"embedding{k}-{strategy}{i}of{n}.log"
                self.logs.append(log)
                with open(log, "w") as err:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, str(HELPER), str(model), str(i), str(n), strategy, str(MAX_PAYLOAD)],
                        stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO))
            for p, log in zip(self.procs, self.logs):
                port_line, ready_line = p.stdout.readline(), p.stdout.readline()
                if not port_line.startswith("PORT") or "READY" not in ready_line:
                    raise RuntimeError(f"embedding server did not start: {port_line!r} {ready_line!r}\n"
                                       f"{log.read_text()[-3000:]}")
                self.ports.append(int(port_line.split()[1]))
        except BaseException:
            self.stop()
            raise

    def view(self, start: int, stop: int) -> "Servers":
        """Some of the processes, as a Servers of their own (stopped with the whole)."""
        v = object.__new__(Servers)
        v.procs, v.logs, v.ports = self.procs[start:stop], self.logs[start:stop], self.ports[start:stop]
        return v

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self, timeout: float = 10.0) -> list[int | None]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append(None)  # did not stop on SIGTERM
            if p.stdout:
                p.stdout.close()
        return codes


class Conn:
    """One ranker-side connection to an embedding server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader(self.sock)

    def send(self, frame: list) -> None:
        send_buffers(self.sock, frame)

    def recv(self):
        h, payload = self.reader.read_frame()
        return h, bytes(payload)  # the reader reuses its buffer

    def expect_error(self, rid: int, code: ErrorCode) -> str:
        h, payload = self.recv()
        msg = codec.decode_error(payload) if h.type == FrameType.ERROR else ""
        assert (h.type, h.request_id, h.aux) == (FrameType.ERROR, rid, int(code)), (h, msg)
        assert msg, "an error frame must say what is wrong"
        return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def processes(tiny_model, tmp_path_factory):
    """Three servers splitting every table by rows, and one holding every table whole."""
    placements = [(i, N_SERVERS, "rows") for i in range(N_SERVERS)] + [(0, 1, "tables")]
    s = Servers(tiny_model, tmp_path_factory.mktemp("embedding"), placements)
    yield s
    codes = s.stop()
    assert codes == [0] * len(codes), f"embedding servers did not stop cleanly on SIGTERM: {codes}"


@pytest.fixture(scope="module")
def servers(processes):
    return processes.view(0, N_SERVERS)


@pytest.fixture(scope="module")
def whole_server(processes):
    return processes.view(N_SERVERS, N_SERVERS + 1)


@pytest.fixture(scope="module")
def world(tiny_model):
    spec = load_spec(tiny_model)
    return spec, RoutingTable.build(spec, N_SERVERS, "rows"), open_tables(tiny_model, spec)


def _conns(servers) -> list[Conn]:
    return [Conn(p) for p in servers.ports]


def lookup(conns: list[Conn], routing: RoutingTable, batch: int, sparse: dict, rid: int = 1) -> dict[str, np.ndarray]:
    """What a ranker does: split by the routing table, one LOOKUP per server, combine the partials."""
    spec = routing.spec
    tidx = list(range(len(spec.tables)))
    plan = split_batch(routing, batch, tidx, [sparse[t.name][0] for t in spec.tables],
                       [sparse[t.name][1] for t in spec.tables])
    for s, part in plan.parts.items():
        conns[s].send(codec.encode_lookup(rid, batch, part.tables, part.lengths, part.values))
    partials: dict[int, list] = {t: [] for t in tidx}
    counts: dict[int, list] = {t: [] for t in tidx}
    rows: dict[int, list] = {t: [] for t in tidx}
    for s, part in plan.parts.items():
        h, payload = conns[s].recv()
        assert h.type == FrameType.LOOKUP_RESP, codec.decode_error(payload) if h.type == FrameType.ERROR else h
        assert h.request_id == rid
        tids, pooled = codec.decode_lookup_response(payload)
        assert tids.tolist() == part.tables
        for t, p, ln, r in zip(part.tables, pooled, part.lengths, part.rows):
            partials[t].append(p)
            counts[t].append(ln)
            rows[t].append(r)    # compact subrequests (protocol 3): the bags sent, scattered back
    out = {}
    for t in tidx:
        ts = spec.tables[t]
        total = np.asarray(sparse[ts.name][1])
        out[ts.name] = (combine_compact(ts.pooling, batch, ts.dim, total, partials[t], counts[t], rows[t])
                        if partials[t] else np.zeros((batch, ts.dim), np.float32))
    return out


def assert_matches_reference(world, batch: int, sparse: dict, got: dict) -> None:
    spec, _routing, tables = world
    for t in spec.tables:
        want = pool_reference(tables[t.name], *sparse[t.name], t.pooling)
        assert got[t.name].shape == (batch, t.dim)
        np.testing.assert_allclose(got[t.name], want, rtol=1e-5, atol=1e-6, err_msg=f"{t.name} ({t.pooling.label})")


def _edge_batch(spec, routing) -> tuple[int, dict]:
    sparse = {}
    for i, t in enumerate(spec.tables):
        (_, b1), = routing.ranges_of(i, 0)   # boundary between server 0 and 1
        (_, b2), = routing.ranges_of(i, 1)   # boundary between server 1 and 2
        bags = [
            [],                              # empty bag
            [b1],                            # one id
            [7, 7, 7, 7, 7],                 # repeated id
            [b1 - 1, b1, b2 - 1, b2],        # both sides of both boundaries
            [0, 1, 2],                       # all on server 0 (the others' partials are empty)
            [t.rows - 1] * 3,                # all on server 2
            [0, t.rows - 1, b1, b2 - 1, 0],  # every server, repeated first row
            [],                              # trailing empty bag
        ]
        sparse[t.name] = (np.array([x for b in bags for x in b], np.int64),
                          np.array([len(b) for b in bags], np.int32))
    return 8, sparse


def _valid(world, conn: Conn, server: int, rid: int) -> None:
    """A valid single-server request on ``conn`` answers correctly (the connection still serves)."""
    spec, routing, tables = world
    t = 1  # the mean table: the partial is a sum over this server's ids
    lo, hi = routing.ranges_of(t, server)[0]
    ids = np.array([lo, hi - 1, lo], np.int64)
    conn.send(codec.encode_lookup(rid, 2, [t], [np.array([2, 1], np.int32)], [ids]))
    h, payload = conn.recv()
    assert (h.type, h.request_id) == (FrameType.LOOKUP_RESP, rid), h
    _, (pooled,) = codec.decode_lookup_response(payload)
    want = pool_reference(tables[spec.tables[t].name], ids, np.array([2, 1]), _sum())
    np.testing.assert_allclose(pooled, want, rtol=1e-5, atol=1e-6)


def _sum():
    from flexemr.types import Pooling

    return Pooling.SUM


# ------------------------------------------------------------------ correctness


def test_routed_batches_equal_pooling_whole_tables(servers, world):
    spec, routing, _ = world
    conns = _conns(servers)
    try:
        gen = RequestGenerator(spec, ids_per_bag=8, seed=21, empty_bag_prob=0.1)
        for rid, b in enumerate((1, 2, 17, 64, 500), start=1):
            _, sparse = gen.batch(b)
            assert_matches_reference(world, b, sparse, lookup(conns, routing, b, sparse, rid))
        b, sparse = _edge_batch(spec, routing)
        assert_matches_reference(world, b, sparse, lookup(conns, routing, b, sparse, 99))
        # A batch where one table has no ids at all, and a batch of empty bags only.
        _, sparse = gen.batch(5)
        sparse["t2"] = (np.zeros(0, np.int64), np.zeros(5, np.int32))
        assert_matches_reference(world, 5, sparse, lookup(conns, routing, 5, sparse, 100))
        sparse = {t.name: (np.zeros(0, np.int64), np.zeros(3, np.int32)) for t in spec.tables}
        assert_matches_reference(world, 3, sparse, lookup(conns, routing, 3, sparse, 101))
    finally:
        for c in conns:
            c.close()


def test_pipelined_requests_are_answered_in_order(servers, world):
    spec, routing, _ = world
    conn = Conn(servers.ports[2])
    try:
        lo, hi = routing.ranges_of(3, 2)[0]
        ids = [np.array([lo + k], np.int64) for k in range(8)]
        for k in range(8):
            conn.send(codec.encode_lookup(1000 + k, 1, [3], [np.array([1], np.int32)], [ids[k]]))
        for k in range(8):
            h, payload = conn.recv()
            assert (h.type, h.request_id) == (FrameType.LOOKUP_RESP, 1000 + k)
            np.testing.assert_array_equal(codec.decode_lookup_response(payload)[1][0][0], world[2]["t3"][lo + k])
    finally:
        conn.close()


# ------------------------------------------------------------------ bad requests


def _lookup_bytes(rid, tids, lengths, values) -> bytearray:
    return bytearray(b"".join(bytes(memoryview(b).cast("B")) for b in codec.encode_lookup(rid, len(lengths[0]), tids,
                                                                                          lengths, values)))


BAD = {
    "unknown table": (ErrorCode.UNKNOWN_TABLE, "#7",
                      lambda rid, w: codec.encode_lookup(rid, 1, [7], [np.array([1], np.int32)], [np.array([0])])),
    # t0 rows [0, 334) live on server 0; 500 is server 1's, 5000 is past the table.
    "id of another shard": (ErrorCode.ID_OUT_OF_RANGE, "id 500",
                            lambda rid, w: codec.encode_lookup(rid, 2, [0], [np.array([1, 1], np.int32)],
                                                               [np.array([3, 500])])),
    "id past the table": (ErrorCode.ID_OUT_OF_RANGE, "id 5000",
                          lambda rid, w: codec.encode_lookup(rid, 1, [0], [np.array([1], np.int32)],
                                                             [np.array([5000])])),
    "negative id": (ErrorCode.ID_OUT_OF_RANGE, "id -1",
                    lambda rid, w: codec.encode_lookup(rid, 1, [2], [np.array([2], np.int32)], [np.array([0, -1])])),
    "unsupported frame": (ErrorCode.UNSUPPORTED, "PREDICT",
                          lambda rid, w: codec.encode_client_request(rid, ["t0"], [np.array([1], np.int32)],
                                                                     [np.array([1])], 1, np.zeros((1, 13), np.float32))),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_gets_error_and_connection_keeps_serving(servers, world, case):
    code, needle, make = BAD[case]
    conn = Conn(servers.ports[0])
    try:
        conn.send(make(41, world))
        msg = conn.expect_error(41, code)
        assert needle in msg, msg
        _valid(world, conn, 0, 42)
    finally:
        conn.close()


def test_malformed_payloads_get_errors_and_connection_keeps_serving(servers, world):
    conn = Conn(servers.ports[1])
    try:
        lo = world[1].ranges_of(0, 1)[0][0]
        raw = _lookup_bytes(51, [0], [np.array([2, 1], np.int32)], [np.array([lo, lo + 1, lo + 2])])
        # Layout after the header: u32 B, u32 T | u32 tid, pad | u32 bags[1], pad | u32 id_bytes, u32 0
        # | i64 counts[1] | i32 lengths[2] | i64 values[3]
        disagree = bytearray(raw)
        struct.pack_into("<i", disagree, HEADER_SIZE + 40, 5)  # lengths now sum to 6, counts say 3
        conn.send([bytes(disagree)])
        assert "sum to 6 but 3" in conn.expect_error(51, ErrorCode.SIZE_MISMATCH)
        _valid(world, conn, 1, 52)

        # Truncated: the header's length is honest but the values section is cut short.
        cut = bytearray(raw[:-8])
        struct.pack_into("<Q", cut, 24, len(cut) - HEADER_SIZE)
        struct.pack_into("<Q", cut, 16, 53)
        conn.send([bytes(cut)])
        assert "truncated" in conn.expect_error(53, ErrorCode.SIZE_MISMATCH)
        _valid(world, conn, 1, 54)

        # Random bytes as a LOOKUP payload.
        junk = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
        conn.send([pack_header(FrameType.LOOKUP, 55, len(junk)), junk])
        h, payload = conn.recv()
        assert (h.type, h.request_id) == (FrameType.ERROR, 55)
        assert h.aux in (ErrorCode.BAD_FRAME, ErrorCode.SIZE_MISMATCH), codec.decode_error(payload)
        _valid(world, conn, 1, 56)
    finally:
        conn.close()


def test_oversized_frame_is_refused_skipped_and_the_connection_keeps_serving(servers, world):
    conn = Conn(servers.ports[0])
    try:
        n = MAX_PAYLOAD + 4096
        conn.send([pack_header(FrameType.LOOKUP, 61, n), bytes(n)])
        msg = conn.expect_error(61, ErrorCode.TOO_LARGE)
        assert str(MAX_PAYLOAD) in msg
        _valid(world, conn, 0, 62)
    finally:
        conn.close()


def test_absurd_length_is_refused_without_allocating_and_others_keep_serving(servers, world):
    proc = psutil.Process(servers.procs[2].pid)
    rss0 = proc.memory_info().rss
    bad = Conn(servers.ports[2])
    other = Conn(servers.ports[2])
    try:
        bad.send([pack_header(FrameType.LOOKUP, 71, 2**60)])
        bad.expect_error(71, ErrorCode.TOO_LARGE)
        # The server now discards what this peer sends; it must not have reserved 2^60 bytes
        # and every other connection is unaffected.
        _valid(world, other, 2, 72)
        assert proc.memory_info().rss - rss0 < 64 * 2**20
    finally:
        bad.close()
        other.close()
    assert servers.alive()


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: flexemr\r\n\r\n"[:HEADER_SIZE],
    pack_header(FrameType.LOOKUP, 81, 8)[:4] + struct.pack("<H", VERSION + 1) + pack_header(FrameType.LOOKUP, 81, 8)[6:],
    pack_header(FrameType.LOOKUP, 81, 8)[:6] + struct.pack("<H", 999) + pack_header(FrameType.LOOKUP, 81, 8)[8:],
], ids=["not-flexemr", "bad-version", "unknown-type"])
def test_garbage_header_closes_only_that_connection(servers, world, garbage):
    bystander = Conn(servers.ports[1])
    bad = Conn(servers.ports[1])
    try:
        _valid(world, bystander, 1, 80)
        bad.send([garbage])
        h, payload = bad.recv()
        assert (h.type, h.aux) == (FrameType.ERROR, ErrorCode.BAD_FRAME), codec.decode_error(payload)
        # ... and then the server hangs up: the stream cannot be resynchronised.
        bad.sock.settimeout(5)
        assert bad.sock.recv(1) == b""
        _valid(world, bystander, 1, 82)       # an open connection keeps serving
        fresh = Conn(servers.ports[1])        # and new ones are accepted
        try:
            _valid(world, fresh, 1, 83)
        finally:
            fresh.close()
    finally:
        bad.close()
        bystander.close()
    assert servers.alive()


def test_peer_vanishing_mid_frame_does_not_hurt_the_server(servers, world):
    for port in servers.ports:
        c = Conn(port)
        raw = _lookup_bytes(91, [0], [np.array([1], np.int32)], [np.array([0])])
        c.sock.sendall(bytes(raw[: HEADER_SIZE + 5]))
        c.close()
    conns = _conns(servers)
    try:
        for s, c in enumerate(conns):
            _valid(world, c, s, 92)
    finally:
        for c in conns:
            c.close()


# ------------------------------------------------------------------ one server holding whole tables


def test_server_holding_whole_tables_pools_and_rejects_bad_ids(whole_server, world):
    """Whole tables are range-checked by the pooling kernel itself; a bad id must still be ID_OUT_OF_RANGE."""
    spec, _, tables = world
    routing = RoutingTable.build(spec, 1, "tables")
    conn = Conn(whole_server.ports[0])
    try:
        b, sparse = _edge_batch(spec, RoutingTable.build(spec, N_SERVERS, "rows"))
        assert_matches_reference(world, b, sparse, lookup([conn], routing, b, sparse, 1))
        for rid, (t, bad) in enumerate([(0, -1), (1, 2003), (2, 517), (3, 2**40)], start=10):
            # The bad id sits in the last table of the request, after good ones.
            ids = [np.array([0, 1]) for _ in range(t)] + [np.array([0, bad])]
            conn.send(codec.encode_lookup(rid, 1, list(range(t + 1)), [np.array([2], np.int32)] * (t + 1), ids))
            msg = conn.expect_error(rid, ErrorCode.ID_OUT_OF_RANGE)
            assert f"id {bad} " in msg and spec.tables[t].name in msg, msg
            _valid(world, conn, 0, rid + 100)
    finally:
        conn.close()
    assert whole_server.alive()
    assert "Traceback" not in whole_server.logs[0].read_text()


# ------------------------------------------------------------------ flow control


def _hello(conn: Conn, name: str, credits: int) -> None:
    frame = codec.encode_hello(0, codec.ROLE_RANKER, name)
    frame[0] = pack_header(FrameType.HELLO, 0, struct.unpack_from("<Q", frame[0], 24)[0], aux=credits)
    conn.send(frame)
    h, payload = conn.recv()
    assert h.type == FrameType.HELLO
    hello = codec.decode_hello(payload)
    assert hello.role == codec.ROLE_EMBEDDING and len(hello.shards) == 4


@pytest.mark.parametrize("token", ["r", "ranker.1234.abc", "exactly8"])
def test_a_data_connection_answers_only_against_credits(servers, world, token):
    """HELLO "<token>/<conn>/data" with credits turns flow control on, whatever the name's length."""
    spec, routing, tables = world
    conn = Conn(servers.ports[0])
    try:
        _hello(conn, f"{token}/7/data", credits=1)
        lo = routing.ranges_of(3, 0)[0][0]
        for rid in (1, 2):
            conn.send(codec.encode_lookup(rid, 1, [3], [np.array([1], np.int32)], [np.array([lo + rid])]))
        h, _ = conn.recv()
        assert h.request_id == 1
        conn.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            conn.recv()  # no credit left: the second answer waits
        conn.sock.settimeout(10)
        conn.send(codec.encode_credit(7, 1, 0))
        h, payload = conn.recv()
        assert (h.type, h.request_id) == (FrameType.LOOKUP_RESP, 2)
        np.testing.assert_array_equal(codec.decode_lookup_response(payload)[1][0][0], tables["t3"][lo + 2])
    finally:
        conn.close()


def test_flow_controlled_connection_pipelines_mixed_requests_correctly(servers, world):
    """Many requests queued ahead of the worker, of varying tables and sizes (the server reuses request buffers)."""
    spec, routing, tables = world
    conn = Conn(servers.ports[1])
    try:
        _hello(conn, "pipe/9/data", credits=3)
        gen = RequestGenerator(spec, ids_per_bag=6, seed=77)
        shapes = [([0, 1, 2, 3], 40), ([3], 3), ([1, 2], 200), ([2], 1), ([0, 3], 64), ([1], 500)] * 2
        sent = []
        for rid, (tids, b) in enumerate(shapes, start=1):
            _, sparse = gen.batch(b)
            plan = split_batch(routing, b, tids, [sparse[spec.tables[t].name][0] for t in tids],
                               [sparse[spec.tables[t].name][1] for t in tids])
            part = plan.parts.get(1)
            if part is None:
                continue             # no bag has ids on server 1: it gets no subrequest (compact, protocol 3)
            conn.send(codec.encode_lookup(rid, b, part.tables, part.lengths, part.values))
            sent.append((rid, part))
        for rid, part in sent:
            h, payload = conn.recv()
            conn.send(codec.encode_credit(9, 1, 0))
            assert (h.type, h.request_id) == (FrameType.LOOKUP_RESP, rid), h
            got_tids, pooled = codec.decode_lookup_response(payload)
            assert got_tids.tolist() == part.tables
            for t, p, v, ln in zip(part.tables, pooled, part.values, part.lengths):
                mode = spec.tables[t].pooling
                want = pool_reference(tables[spec.tables[t].name], v, ln, mode if mode.label == "max" else _sum())
                np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
    finally:
        conn.close()


def test_inband_credit_frame_too_short_for_its_trailer_gets_an_error(servers, world):
    conn = Conn(servers.ports[0])
    try:
        _hello(conn, "inband/8/data", credits=4)
        conn.send([pack_header(FrameType.LOOKUP, 111, 4, aux=1, flags=1), b"\0\0\0\0"])
        conn.expect_error(111, ErrorCode.SIZE_MISMATCH)
        _valid(world, conn, 0, 112)
    finally:
        conn.close()


# ------------------------------------------------------------------ concurrency


def test_eight_concurrent_rankers_get_correct_answers(servers, world):
    spec, routing, _ = world
    errors: list[BaseException] = []
    done = [0] * 8

    def ranker(k: int) -> None:
        conns = _conns(servers)
        try:
            gen = RequestGenerator(spec, ids_per_bag=8, seed=300 + k)
            for i in range(12):
                b = (1, 7, 33, 128)[i % 4]
                _, sparse = gen.batch(b)
                got = lookup(conns, routing, b, sparse, rid=k * 1000 + i)
                assert_matches_reference(world, b, sparse, got)
                done[k] += 1
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            for c in conns:
                c.close()

    threads = [threading.Thread(target=ranker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert done == [12] * 8


def test_no_server_thread_crashed(processes):
    """Every bad request above was answered, not survived by a dying thread."""
    assert processes.alive()
    for log in processes.logs:
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
