"""The embedding server in-process: a real loopback listener, the event loop in a thread.

What a ranker (or an attacker) would notice: idle connections cost no
threads, a header announcing 1 GiB costs no gigabyte, one connection over the
cap is told why before it is closed, pipelined frames of every kind come back
in order, a malformed HELLO is answered, credits on the priority channel
release the data connection, running out of descriptors pauses accepting
rather than spinning, and the loop beats its heartbeat.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import threading
import time

import numpy as np
import psutil
import pytest

from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables
from flexemr.pooling import partial_pooling, pool_reference
from flexemr.reqgen import RequestGenerator
from flexemr.routing.table import RoutingTable
from flexemr.transport.tcp import TcpTransport, parse_address
from flexemr.wire import codec
from flexemr.wire.frame import ErrorCode, FrameType, pack_header
from flexemr.wire.stream import FrameReader, send_buffers

from flexemrd.embedding.server import EmbeddingServer
from flexemrd.embedding.store import EmbeddingStore


@pytest.fixture(scope="module")
def world(tiny_model):
    spec = load_spec(tiny_model)
    routing = RoutingTable.build(spec, 1, "tables")  # one server holding every table whole
    store = EmbeddingStore(str(tiny_model), spec, routing.shards_of(0))
    return spec, store, open_tables(tiny_model, spec)


class Running:
    """A server's loop on a thread; ``beats`` records every heartbeat."""

    def __init__(self, store: EmbeddingStore, **kw) -> None:
        self.beats: list[float] = []
        self.server = EmbeddingServer(store, TcpTransport().listen("127.0.0.1:0"),
                                      beat=lambda: self.beats.append(time.monotonic()), **kw)
        self.port = parse_address(self.server.address)[1]
        started = threading.Event()
        self.thread = threading.Thread(target=self.server.serve_forever, args=(started.set,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "serve_forever did not return after stop()"


@contextlib.contextmanager
def running(world, **kw):
    r = Running(world[1], **kw)
    try:
        yield r
    finally:
        r.stop()


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = FrameReader(self.sock)

    def send(self, frame: list) -> None:
        send_buffers(self.sock, frame)

    def recv(self):
        h, payload = self.reader.read_frame()
        return h, bytes(payload)

    def ping(self, rid: int) -> None:
        self.send([pack_header(FrameType.PING, rid, 0)])
        h, _ = self.recv()
        assert (h.type, h.request_id) == (FrameType.PONG, rid), h

    def close(self) -> None:
        self.sock.close()


def _check_lookup(world, payload: bytes, tids: list[int], values: list, lengths: list) -> None:
    spec, _store, tables = world
    got_tids, pooled = codec.decode_lookup_response(payload)
    assert got_tids.tolist() == tids
    for t, p, v, ln in zip(tids, pooled, values, lengths):
        tab = spec.tables[t]
        want = pool_reference(tables[tab.name], v, ln, partial_pooling(tab.pooling))
        np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6, err_msg=tab.name)


def test_300_idle_connections_do_not_cost_300_threads(world):
    with running(world, workers=2, max_connections=400) as r:
        before = threading.active_count()
        clients = [Client(r.port) for _ in range(300)]
        try:
            for i, c in enumerate(clients):  # every one of them is served
                c.ping(i)
            grown = threading.active_count() - before
            assert grown <= 4, f"{grown} threads for 300 connections (the pool has 2 workers)"
            clients[-1].send([pack_header(FrameType.STATS, 9, 0)])
            h, payload = clients[-1].recv()
            assert h.type == FrameType.STATS_RESP and codec.decode_stats(payload)["connections"] == 300
        finally:
            for c in clients:
                c.close()


def test_one_worker_pools_on_the_loop_thread_and_starts_no_pool_thread(world):
    """workers=1: no pooling thread (its hand-off cost more than it overlapped); the loop pools
    between polls, so a PING sent behind a lookup is still answered, in order, and a bad id is
    answered with an error while the next lookup is served."""
    spec, _store, _tables = world
    before = {t.name for t in threading.enumerate()}
    with running(world, workers=1) as r:
        c = Client(r.port)
        try:
            _, sparse = RequestGenerator(spec, ids_per_bag=10, seed=9).batch(500)
            v, ln = [sparse["t0"][0]], [sparse["t0"][1]]
            c.send(codec.encode_lookup(1, 500, [0], ln, v))
            c.send([pack_header(FrameType.PING, 2, 0)])
            c.send(codec.encode_lookup(3, 1, [0], [np.array([1], np.int32)], [np.array([10**6])]))
            c.send(codec.encode_lookup(4, 500, [0], ln, v))
            got = [c.recv() for _ in range(4)]
            assert [(h.request_id, h.type) for h, _ in got] == [
                (1, FrameType.LOOKUP_RESP), (2, FrameType.PONG), (3, FrameType.ERROR), (4, FrameType.LOOKUP_RESP)]
            assert got[2][0].aux == ErrorCode.ID_OUT_OF_RANGE, codec.decode_error(got[2][1])
            _check_lookup(world, got[0][1], [0], v, ln)
            assert got[3][1] == got[0][1]
            pool_threads = {t.name for t in threading.enumerate()} - before
            assert not any("pool" in n for n in pool_threads), pool_threads
        finally:
            c.close()
    listener = TcpTransport().listen("127.0.0.1:0")
    try:
        with pytest.raises(ValueError, match="workers must be 1"):
            EmbeddingServer(world[1], listener, workers=2, inline=True)
    finally:
        listener.close()


def test_a_header_announcing_1GiB_then_stalling_allocates_nothing_big(world):
    proc = psutil.Process()
    with running(world) as r:
        good = Client(r.port)
        stalled = [Client(r.port) for _ in range(4)]
        try:
            good.ping(1)
            rss0 = proc.memory_info().rss
            for i, c in enumerate(stalled):
                c.send([pack_header(FrameType.LOOKUP, 100 + i, 1 << 30), bytes(1000)])  # exactly the limit
            time.sleep(0.5)
            good.ping(2)  # the loop is not stuck on the stalled peers
            grown = proc.memory_info().rss - rss0
            assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB for 4 stalled 1 GiB headers"
        finally:
            good.close()
            for c in stalled:
                c.close()


def test_one_connection_over_the_cap_is_told_why_and_closed(world):
    with running(world, max_connections=3) as r:
        kept = [Client(r.port) for _ in range(3)]
        for i, c in enumerate(kept):
            c.ping(i)
        extra = Client(r.port)
        h, payload = extra.recv()
        msg = codec.decode_error(payload)
        assert (h.type, h.aux) == (FrameType.ERROR, ErrorCode.OVERLOADED), msg
        assert "at most 3 connections" in msg and "max_connections" in msg, msg
        extra.sock.settimeout(5)
        assert extra.sock.recv(1) == b"", "a refused connection must be closed"
        extra.close()
        kept[0].ping(10)  # the served ones are unaffected
        kept.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the freed slot is reused once the loop has seen the close
            fresh = Client(r.port)
            fresh.send([pack_header(FrameType.PING, 11, 0)])
            h, _ = fresh.recv()
            fresh.close()
            if h.type == FrameType.PONG or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert h.type == FrameType.PONG, "a slot freed by a closed connection must be served again"
        for c in kept:
            c.close()


@pytest.mark.parametrize("workers", [4, 1], ids=["4-workers", "inline"])
def test_pipelined_frames_of_every_kind_are_answered_in_order(world, workers):
    """Pooling runs on 4 workers at once (or on the loop itself, one at a time); big and small
    requests, loop-answered frames and errors interleave, and the answers still come back in
    request order."""
    spec, _store, tables = world
    max_payload = 1 << 20
    with running(world, workers=workers, max_payload=max_payload) as r:
        assert r.server.inline == (workers == 1)
        c = Client(r.port)
        try:
            gen = RequestGenerator(spec, ids_per_bag=10, seed=5)
            expect = []
            for rid in range(1, 41):
                kind = rid % 8
                if kind in (0, 1, 2, 3):
                    b = (4000, 1, 30, 2)[kind]  # a big one ahead of small ones
                    tids = [0, 1, 2, 3][: 1 + kind]
                    _, sparse = gen.batch(b)
                    v = [sparse[spec.tables[t].name][0] for t in tids]
                    ln = [sparse[spec.tables[t].name][1] for t in tids]
                    c.send(codec.encode_lookup(rid, b, tids, ln, v))
                    expect.append((rid, FrameType.LOOKUP_RESP, (tids, v, ln)))
                elif kind == 4:
                    c.send([pack_header(FrameType.PING, rid, 0)])
                    expect.append((rid, FrameType.PONG, None))
                elif kind == 5:
                    ids = np.array([0, 5, 1000], np.int64)
                    c.send(codec.encode_fetch(rid, 0, ids))
                    expect.append((rid, FrameType.FETCH_RESP, ids))
                elif kind == 6:
                    c.send(codec.encode_lookup(rid, 1, [0], [np.array([1], np.int32)], [np.array([10**6])]))
                    expect.append((rid, FrameType.ERROR, ErrorCode.ID_OUT_OF_RANGE))
                else:
                    n = max_payload + 10
                    c.send([pack_header(FrameType.LOOKUP, rid, n), bytes(n)])
                    expect.append((rid, FrameType.ERROR, ErrorCode.TOO_LARGE))
            for rid, ftype, what in expect:
                h, payload = c.recv()
                assert (h.request_id, h.type) == (rid, ftype), (h, codec.decode_error(payload) if h.type == 6 else "")
                if ftype == FrameType.LOOKUP_RESP:
                    _check_lookup(world, payload, *what)
                elif ftype == FrameType.FETCH_RESP:
                    tid, rows = codec.decode_fetch_response(payload)
                    np.testing.assert_array_equal(rows, tables["t0"][what])
                elif ftype == FrameType.ERROR:
                    assert h.aux == what, codec.decode_error(payload)
        finally:
            c.close()


def test_a_malformed_hello_is_answered_and_the_connection_keeps_serving(world):
    with running(world) as r:
        c = Client(r.port)
        try:
            c.send([pack_header(FrameType.HELLO, 3, 3), b"abc"])
            h, payload = c.recv()
            assert (h.type, h.request_id) == (FrameType.ERROR, 3), h
            assert "HELLO" in codec.decode_error(payload)
            c.ping(4)
        finally:
            c.close()


def _hello(c: Client, name: str, credits: int) -> None:
    frame = codec.encode_hello(0, codec.ROLE_RANKER, name)
    frame[0] = pack_header(FrameType.HELLO, 0, struct.unpack_from("<Q", frame[0], 24)[0], aux=credits)
    c.send(frame)
    h, _ = c.recv()
    assert h.type == FrameType.HELLO


@pytest.mark.parametrize("workers", [2, 1], ids=["2-workers", "inline"])
def test_credits_on_the_priority_channel_release_the_data_connection(world, workers):
    with running(world, workers=workers) as r:
        data, credit = Client(r.port), Client(r.port)
        try:
            _hello(data, "tok/3/data", credits=1)
            _hello(credit, "tok/3/credit", credits=0)
            for rid in (1, 2):
                data.send(codec.encode_lookup(rid, 1, [3], [np.array([1], np.int32)], [np.array([rid])]))
            assert data.recv()[0].request_id == 1
            data.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                data.recv()  # no credit left: the second answer waits
            data.sock.settimeout(10)
            credit.send(codec.encode_credit(3, 1, time.monotonic_ns()))
            h, payload = data.recv()
            assert (h.type, h.request_id) == (FrameType.LOOKUP_RESP, 2)
            _check_lookup(world, payload, [3], [np.array([2])], [np.array([1], np.int32)])
            data.send([pack_header(FrameType.STATS, 5, 0)])
            stats = codec.decode_stats(data.recv()[1])
            assert stats["credits_received"] == 2 and stats["credit_waits"] >= 1 and stats["credit_samples"] == 1
        finally:
            data.close()
            credit.close()


def test_the_loop_beats_at_least_once_a_second_while_idle(world):
    with running(world) as r:
        time.sleep(2.2)
        beats = list(r.beats)
    assert len(beats) >= 3, beats
    assert max(np.diff(beats)) < 1.0, np.diff(beats)


def test_running_out_of_descriptors_pauses_accepting_instead_of_spinning(world, caplog):
    """EMFILE leaves the listener readable: the loop must back off, then accept once descriptors free up."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with running(world) as r:
        first = Client(r.port)
        first.ping(1)
        waiting = None
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        filler: list[int] = []
        try:
            while True:  # take every descriptor left, then give one back for the client's socket
                try:
                    filler.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    break
            os.close(filler.pop())
            waiting = socket.create_connection(("127.0.0.1", r.port), timeout=10)  # the server's accept() gets EMFILE
            t0 = _process_cpu()  # this thread sleeps and the pool is idle: what is spent is the loop's
            time.sleep(1.0)
            spent = _process_cpu() - t0
            assert spent < 0.2, f"the event loop used {spent:.2f} s of CPU in 1 s while it could not accept"
            first.ping(2)  # connections already served keep being served
            assert "cannot accept connections for now" in caplog.text
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert waiting is not None
        waiting.settimeout(10)
        send_buffers(waiting, [pack_header(FrameType.PING, 3, 0)])
        h = FrameReader(waiting).read_header()  # accepted after the back-off
        assert (h.type, h.request_id) == (FrameType.PONG, 3)
        waiting.close()
        first.close()


def _process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # needs no descriptor, unlike psutil
    return ru.ru_utime + ru.ru_stime


@pytest.mark.parametrize("partials, rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_a_server_answers_int32_ids_with_the_partials_precision_the_ranker_asked_for(world, partials, rel):
    """Protocol 2 on a real server: int32 ids pool like int64 ones; the answer is half the bytes and
    within one rounding of the fp32 partial."""
    spec, _store, _tables = world
    with running(world) as r:
        c = Client(r.port)
        try:
            _, sparse = RequestGenerator(spec, ids_per_bag=10, seed=8).batch(64)
            tids = [0, 1]
            v = [sparse[spec.tables[t].name][0].astype(np.int32) for t in tids]
            ln = [sparse[spec.tables[t].name][1] for t in tids]
            c.send(codec.encode_lookup(1, 64, tids, ln, v))
            _h, full = c.recv()
            c.send(codec.encode_lookup(2, 64, tids, ln, v, flags=codec.partials_flags(partials)))
            h, half = c.recv()
            assert h.type == FrameType.LOOKUP_RESP, codec.decode_error(half) if h.type == 6 else ""
            assert len(half) < 0.6 * len(full), "reduced-precision partials halve the answer"
            _check_lookup(world, full, tids, v, ln)
            for exact, got in zip(codec.decode_lookup_response(full)[1], codec.decode_lookup_response(half)[1]):
                assert np.all(np.abs(got - exact) <= rel * np.abs(exact) + 2.0**-24)
        finally:
            c.close()
