"""The inference process's pieces, in process and without forking: batcher, completions, finisher.

Real rings (shared memory) and real model directories; the only stand-in is
the reply sink, which records what a client would have received.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from flexemr import enginemsg as em
from flexemr.monolithic import MonolithicModel
from flexemr.reqgen import RequestGenerator
from flexemr.routing.table import RoutingTable
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, FrameType, unpack_header

from flexemrd.inference.admission import Admission, Work
from flexemrd.inference.batch import Batch
from flexemrd.inference.batcher import Batcher
from flexemrd.inference.completions import Completions
from flexemrd.inference.finisher import Finisher
from flexemrd.inference.local import LocalPooler
from flexemrd.inference.lookups import LookupEncoder
from flexemrd.inference.pending import PendingTable
from flexemrd.inference.stats import ServiceStats
from flexemrd.inference.submission import Submitter


class Replies:
    """What the client of each request got back."""

    def __init__(self) -> None:
        self.got: dict[int, tuple[str, object]] = {}
        self.done = threading.Condition()

    def _put(self, rid: int, what: str, value: object) -> None:
        with self.done:
            self.got[rid] = (what, value)
            self.done.notify_all()

    def scores(self, request_id, scores, version=0):
        self._put(request_id, "scores", np.array(scores))

    def pooled(self, request_id, names, pooled, version=0):
        self._put(request_id, "pooled", {n: np.array(p) for n, p in zip(names, pooled)})

    def error(self, request_id, code, message):
        self._put(request_id, "error", message)

    def wait(self, n: int, timeout: float = 10.0) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.got) >= n, timeout), self.got


@pytest.fixture(scope="module")
def model(tiny_model):
    return MonolithicModel(tiny_model)


def _request(model, batch: int, seed: int):
    return RequestGenerator(model.spec, ids_per_bag=5, seed=seed).batch(batch)


def _work(model, replies, rid: int, batch: int, seed: int, predict: bool = True) -> Work:
    dense, sparse = _request(model, batch, seed)
    names = list(sparse)
    req = codec.ClientRequest(names, dense if predict else None, _kjt(names, sparse))
    work = Admission(model.spec).admit(replies, rid, predict, req)
    assert work is not None
    return work


def _kjt(names, sparse):
    frame = codec.encode_client_request(0, names, [sparse[n][1] for n in names], [sparse[n][0] for n in names],
                                        len(sparse[names[0]][1]), None)
    blob = b"".join(bytes(memoryview(b).cast("B")) for b in frame)
    return codec.decode_client_request(memoryview(blob)[HEADER_SIZE:], FrameType.CLIENT_LOOKUP).kjt


def _pipeline(model, max_batch=256, max_wait_s=0.05, local=True, submitter=None, routing=None, pending=None,
              health=None):
    stats = ServiceStats(len(model.spec.tables))
    inflight = threading.BoundedSemaphore(4)
    fin = Finisher(model.spec, model.dense, "cpu", stats, inflight)
    routing = routing or RoutingTable.build(model.spec, 1)
    batches: list[Batch] = []

    def finish(batch: Batch) -> None:
        batches.append(batch)
        fin.put(batch)

    batcher = Batcher(model.spec, routing, submitter, PendingTable() if pending is None else pending, finish, fin.fail, stats, inflight,
                      max_batch, max_wait_s,
                      local=LocalPooler(model.spec, model.tables) if local else None, health=health)
    return batcher, fin, batches


def _run(*loops):
    threads = [threading.Thread(target=fn, daemon=True) for fn in loops]
    for t in threads:
        t.start()
    return threads


# ---------------------------------------------------------------------------------------------- batcher


def test_batcher_coalesces_requests_up_to_max_batch_and_carries_the_rest(model):
    replies = Replies()
    batcher, fin, batches = _pipeline(model, max_batch=100, max_wait_s=0.2)
    works = [_work(model, replies, i, 30, seed=i) for i in range(1, 5)]   # 4 x 30 samples
    for w in works:
        batcher.queue.put(w)
    _run(batcher.run, fin.run)
    replies.wait(4)
    batcher.stop.set()
    fin.queue.put(None)
    # 30+30+30 fit in 100; the fourth would make 120: it waits for the next batch.
    assert [b.size for b in batches] == [90, 30]
    for w in works:
        what, scores = replies.got[w.request_id]
        assert what == "scores"
        dense, sparse = _request(model, 30, seed=w.request_id)
        np.testing.assert_allclose(scores, model.predict(dense, sparse), rtol=1e-5, atol=1e-6)


def test_monolithic_pooling_off_the_batcher_answers_exactly_and_a_table_that_fails_is_named(model):
    """Tables pool on their own threads (several batches in flight); a pooling failure answers the
    batch's requests with an error naming the table instead of hanging them, and later batches still work."""
    replies = Replies()
    batcher, fin, _batches = _pipeline(model, max_batch=64, max_wait_s=0.01)
    local = batcher.local
    broken = {"on": False}
    real_pool = local.pool

    def pool(table, values, lengths):
        if broken["on"] and table == 1:
            raise RuntimeError("simulated kernel failure")
        return real_pool(table, values, lengths)

    local.pool = pool
    _run(batcher.run, fin.run)
    try:
        for i in range(1, 9):                       # 8 batches of 64: several pool at once
            batcher.queue.put(_work(model, replies, i, 64, seed=i))
        replies.wait(8)
        for i in range(1, 9):
            what, scores = replies.got[i]
            dense, sparse = _request(model, 64, seed=i)
            assert what == "scores"
            np.testing.assert_allclose(scores, model.predict(dense, sparse), rtol=1e-5, atol=1e-6)
        broken["on"] = True
        batcher.queue.put(_work(model, replies, 20, 64, seed=20))
        replies.wait(9)
        what, msg = replies.got[20]
        assert what == "error" and model.spec.tables[1].name in msg and "simulated kernel failure" in msg, msg
        broken["on"] = False
        batcher.queue.put(_work(model, replies, 21, 64, seed=21))
        replies.wait(10)
        assert replies.got[21][0] == "scores"
    finally:
        batcher.stop.set()
        fin.queue.put(None)


def test_batcher_splits_misses_per_server_onto_the_owning_engines_ring(model, instance):
    from flexemr import naming
    from flexemr.ring import Ring

    rings = [Ring.create(naming.shm_name(instance, "ring", f"u{e}"), 32 << 20) for e in range(2)]
    try:
        routing = RoutingTable.build(model.spec, 2)
        connections = {0: (0, "a"), 1: (1, "b")}
        submitter = Submitter(rings, connections, owners={0: 1, 1: 0})
        pending = PendingTable()
        replies = Replies()
        from flexemrd.inference.health import ServerHealth

        batcher, _fin, _batches = _pipeline(model, local=False, submitter=submitter, routing=routing,
                                            pending=pending, health=ServerHealth(routing, connections))
        work = _work(model, replies, 7, 16, seed=3)
        batcher._dispatch([work])
        seen = {}
        for engine, ring in enumerate(rings):
            msg = ring.read(timeout=1)
            assert msg is not None and msg.kind == em.SUB_FRAME
            cid, _ = em.PREFIX.unpack_from(msg.data, 0)
            h = unpack_header(msg.data[em.PREFIX_SIZE:em.PREFIX_SIZE + HEADER_SIZE])
            req = codec.decode_lookup(msg.data[em.PREFIX_SIZE + HEADER_SIZE:em.PREFIX_SIZE + HEADER_SIZE
                                               + h.payload_len], h.flags)
            seen[cid] = (engine, req.kjt.table(0)[0].copy())
            msg.release()
            assert pending.take_lookup(h.request_id) is not None
        # Connection 0 (server 0) is owned by engine 1 and connection 1 by engine 0.
        assert seen[0][0] == 1 and seen[1][0] == 0
        t0 = model.spec.tables[0]
        lo, hi = routing.ranges_of(0, 0)[0]
        ids = work.tables[0][0]
        np.testing.assert_array_equal(np.sort(seen[0][1]), np.sort(ids[(ids >= lo) & (ids < hi)]))
        assert len(seen[0][1]) + len(seen[1][1]) == len(ids) and t0.rows > 0
    finally:
        for r in rings:
            r.close()
            r.unlink()


# ---------------------------------------------------------------------------------------------- completions


def _completions(model, rings, bell, pending, finish, routing, connections, **kw):
    from flexemrd.inference.health import ServerHealth
    from flexemrd.inference.stats import FailoverCounters

    submitter = Submitter(kw.pop("sub_rings", []), connections, {c: 0 for c in connections})
    return Completions(rings, bell, pending, finish, ServerHealth(routing, connections), submitter,
                       FailoverCounters(), 30.0, LookupEncoder(model.spec), **kw)


def _server_partials(model, routing, batch_work, server):
    """What embedding server ``server`` would answer for its share of ``batch_work``."""
    from flexemr.routing.split import split_batch

    tables = sorted(batch_work.tables)
    values = [batch_work.tables[t][0] for t in tables]
    lengths = [batch_work.tables[t][1] for t in tables]
    plan = split_batch(routing, batch_work.batch, tables, values, lengths)
    part = plan.parts[server]
    pooled = []
    for t, v, ln in zip(part.tables, part.values, part.lengths):
        spec = model.spec.tables[t]
        full = LocalPooler(model.spec, model.tables).pool(t, v, ln)
        if spec.pooling.label == "mean":   # servers send partial sums for mean tables
            full = full * np.maximum(ln, 1)[:, None].astype(np.float32)
        pooled.append(full)
    return part, pooled


def test_completions_combine_partials_from_every_server_exactly(model, instance):
    from flexemr import naming
    from flexemr.ring import Doorbell, Ring

    bell = Doorbell.create(naming.doorbell_name(instance, "t"))
    ring = Ring.create(naming.shm_name(instance, "ring", "comp"), 32 << 20, doorbell=bell)
    try:
        routing = RoutingTable.build(model.spec, 3)
        replies = Replies()
        work = _work(model, replies, 1, 24, seed=11, predict=False)
        tables = sorted(work.tables)
        batch = Batch(1, [work], model.spec, tables, [work.tables[t][1] for t in tables])
        pending = PendingTable()
        done: list[Batch] = []
        comp = _completions(model, [ring], bell, pending, done.append, routing, {s: (s, f"srv{s}") for s in range(3)})
        from flexemrd.inference.batch import Part

        for server in range(3):
            part, _ = _server_partials(model, routing, work, server)
            batch.expect(100 + server, Part(server, server, server, part.tables, part.lengths, part.values, part.rows))
        pending.add_lookups(batch, [100, 101, 102])
        for server in (2, 0, 1):   # any order
            part, pooled = _server_partials(model, routing, work, server)
            frame = codec.encode_lookup_response(100 + server, np.array(part.tables, "<u4"), pooled)
            assert ring.write(em.PREFIX.pack(server, 0), *frame, kind=em.COMP_FRAME, timeout=1)
            assert comp.drain() == 1
            assert len(done) == (1 if server == 1 else 0)
        got = batch.pooled()
        want = model.lookup({n: work.tables[i] for i, n in ((i, model.spec.tables[i].name) for i in tables)})
        for t in tables:
            np.testing.assert_allclose(got[t], want[model.spec.tables[t].name], rtol=1e-5, atol=1e-5)
    finally:
        ring.close()
        ring.unlink()
        bell.close()
        bell.unlink()


def test_completions_fail_a_batch_at_once_when_its_connection_is_lost(model, instance):
    from flexemr import naming
    from flexemr.ring import Doorbell, Ring

    bell = Doorbell.create(naming.doorbell_name(instance, "t"))
    ring = Ring.create(naming.shm_name(instance, "ring", "comp"), 1 << 20, doorbell=bell)
    try:
        replies = Replies()
        work = _work(model, replies, 1, 4, seed=2)
        batch = Batch(1, [work], model.spec, [0], [work.tables[0][1]])
        from flexemrd.inference.batch import Part

        batch.expect(5, Part(0, 0, 3, [0], [work.tables[0][1]], [work.tables[0][0]]))
        batch.expect(6, Part(1, 1, 4, [0], [work.tables[0][1]], [work.tables[0][0]]))
        pending = PendingTable()
        pending.add_lookups(batch, [5, 6])
        done: list[Batch] = []
        comp = _completions(model, [ring], bell, pending, done.append, RoutingTable.build(model.spec, 2),
                            {3: (0, "x"), 4: (1, "y")})
        ring.write(em.PREFIX.pack(3, 0), b"connection to server 0 (x) lost: reset", kind=em.COMP_LOST, timeout=1)
        comp.drain()
        assert not done, "the other part is still owed"
        ring.write(em.PREFIX.pack(4, 0), *codec.encode_error(6, 1, "table t0 is not held by this server"),
                   kind=em.COMP_FRAME, timeout=1)
        comp.drain()
        assert done == [batch]
        assert batch.error.startswith("connection to server 0 (x) lost: reset")
        assert "embedding server 0 (x)" in batch.error, "the error names the server that is down"
        assert not pending
    finally:
        ring.close()
        ring.unlink()
        bell.close()
        bell.unlink()


# ---------------------------------------------------------------------------------------------- finisher


def test_finisher_answers_a_mixed_predict_and_lookup_batch_exactly(model):
    replies = Replies()
    stats = ServiceStats(len(model.spec.tables))
    inflight = threading.BoundedSemaphore(1)
    inflight.acquire()
    fin = Finisher(model.spec, model.dense, "cpu", stats, inflight)
    works = [_work(model, replies, 1, 8, seed=5), _work(model, replies, 2, 3, seed=6, predict=False),
             _work(model, replies, 3, 5, seed=7)]
    tables = list(range(len(model.spec.tables)))
    from flexemrd.inference.batch import merge

    values, lengths = merge(works, tables)
    batch = Batch(1, works, model.spec, tables, lengths)
    pooler = LocalPooler(model.spec, model.tables)
    for t, v, ln in zip(tables, values, lengths):
        batch.set_pooled(t, pooler.pool(t, v, ln))
    fin.put(batch)
    fin.put(None)
    fin.run()
    assert inflight.acquire(timeout=0), "the batch's in-flight slot was released"
    for w, seed, predict in ((works[0], 5, True), (works[1], 6, False), (works[2], 7, True)):
        dense, sparse = _request(model, w.batch, seed)
        what, value = replies.got[w.request_id]
        if predict:
            assert what == "scores"
            np.testing.assert_allclose(value, model.predict(dense, sparse), rtol=1e-5, atol=1e-6)
        else:
            assert what == "pooled"
            want = model.lookup(sparse)
            for name in sparse:
                np.testing.assert_allclose(value[name], want[name], rtol=1e-5, atol=1e-6)
    assert stats.batches == 1 and stats.latency.count == 3


def test_finisher_answers_every_request_of_a_failed_batch_with_the_reason(model):
    replies = Replies()
    stats = ServiceStats(len(model.spec.tables))
    inflight = threading.BoundedSemaphore(1)
    inflight.acquire()
    fin = Finisher(model.spec, model.dense, "cpu", stats, inflight)
    works = [_work(model, replies, i, 2, seed=i) for i in (1, 2)]
    batch = Batch(1, works, model.spec, [0], [works[0].tables[0][1]])
    assert batch.fail(None, "embedding server 1: deadline passed")
    fin.put(batch)
    fin.put(None)
    t0 = time.monotonic()
    fin.run()
    assert time.monotonic() - t0 < 5
    assert replies.got == {1: ("error", "embedding server 1: deadline passed"),
                           2: ("error", "embedding server 1: deadline passed")}
    assert stats.errors == 2


# ---------------------------------------------------------------------------------------------- failover


class _Rings:
    """Two submission rings and one completion ring, unlinked afterwards."""

    def __init__(self, instance: str) -> None:
        from flexemr import naming
        from flexemr.ring import Doorbell, Ring

        self.bell = Doorbell.create(naming.doorbell_name(instance, "f"))
        self.sub = [Ring.create(naming.shm_name(instance, "ring", f"s{e}"), 8 << 20) for e in range(2)]
        self.comp = Ring.create(naming.shm_name(instance, "ring", "c"), 8 << 20, doorbell=self.bell)

    def close(self) -> None:
        for r in (*self.sub, self.comp):
            r.close()
            r.unlink()
        self.bell.close()
        self.bell.unlink()

    def frames(self) -> list[tuple[int, object, bytes]]:
        """(connection, header, payload bytes) of every frame written to the submission rings so far."""
        out = []
        for ring in self.sub:
            while (msg := ring.read(timeout=0)) is not None:
                cid, _ = em.PREFIX.unpack_from(msg.data, 0)
                h = unpack_header(msg.data[em.PREFIX_SIZE:em.PREFIX_SIZE + HEADER_SIZE])
                out.append((cid, h, bytes(msg.data[em.PREFIX_SIZE + HEADER_SIZE:
                                                   em.PREFIX_SIZE + HEADER_SIZE + h.payload_len])))
                msg.release()
        return out

    def submitted(self) -> list[tuple[int, int]]:
        """(connection, request id) of every LOOKUP written to the submission rings so far."""
        out = []
        for ring in self.sub:
            while (msg := ring.read(timeout=0)) is not None:
                cid, _ = em.PREFIX.unpack_from(msg.data, 0)
                out.append((cid, unpack_header(msg.data[em.PREFIX_SIZE:em.PREFIX_SIZE + HEADER_SIZE]).request_id))
                msg.release()
        return out


def _replicated(model, instance, hedging=False):
    """A batch of one part (server 0's shards, held by servers 0 and 1) registered as in flight on server 0."""
    from flexemrd.inference.batch import Part
    from flexemrd.inference.health import ServerHealth
    from flexemrd.inference.stats import FailoverCounters

    rings = _Rings(instance)
    routing = RoutingTable.build(model.spec, 2, "rows", replicas=2)
    connections = {0: (0, "a:1"), 1: (1, "b:1")}
    health = ServerHealth(routing, connections)
    submitter = Submitter(rings.sub, connections, {0: 0, 1: 1})
    pending = PendingTable()
    done: list[Batch] = []
    comp = Completions([rings.comp], rings.bell, pending, done.append, health, submitter, FailoverCounters(), 30.0,
                       LookupEncoder(model.spec), hedging=hedging, hedge_min_s=0.01)
    replies = Replies()
    work = _work(model, replies, 1, 8, seed=4, predict=False)
    t = sorted(work.tables)
    batch = Batch(1, [work], model.spec, t, [work.tables[i][1] for i in t])
    part = Part(0, 0, 0, t, [work.tables[i][1] for i in t], [work.tables[i][0] for i in t])
    assert health.choose(0) == (0, 0)
    batch.expect(10, part)
    pending.add_lookups(batch, [10])
    batch.mark_submitted()
    return rings, comp, batch, done, health


def _answer(model, work_batch, rid):
    tables = work_batch.tables
    pooled = [LocalPooler(model.spec, model.tables).pool(t, work_batch.works[0].tables[t][0],
                                                          work_batch.works[0].tables[t][1]) for t in tables]
    pooled = [p * np.maximum(work_batch.works[0].tables[t][1], 1)[:, None].astype(np.float32)
              if model.spec.tables[t].pooling.label == "mean" else p for p, t in zip(pooled, tables)]
    return codec.encode_lookup_response(rid, np.array(tables, "<u4"), pooled)


def test_a_lost_connections_parts_are_reissued_to_a_live_replica(model, instance):
    rings, comp, batch, done, health = _replicated(model, instance)
    try:
        rings.comp.write(em.PREFIX.pack(0, 0), b"connection to server 0 (a:1) lost: reset", kind=em.COMP_LOST,
                         timeout=1)
        comp.drain()
        sent = rings.submitted()
        assert len(sent) == 1 and sent[0][0] == 1, "re-issued once, on server 1's connection"
        assert comp.counters.reissued == 1 and not done
        assert health.choose(0)[0] == 1, "server 0 is down: its shards go to the replica"
        rings.comp.write(em.PREFIX.pack(1, 0), *_answer(model, batch, sent[0][1]), kind=em.COMP_FRAME, timeout=1)
        comp.drain()
        assert done == [batch] and batch.error is None
        want = model.lookup({model.spec.tables[t].name: batch.works[0].tables[t] for t in batch.tables})
        for t, got in batch.pooled().items():
            np.testing.assert_allclose(got, want[model.spec.tables[t].name], rtol=1e-5, atol=1e-5)
    finally:
        rings.close()


def test_a_slow_part_is_hedged_once_and_the_first_answer_wins(model, instance):
    rings, comp, batch, done, health = _replicated(model, instance, hedging=True)
    try:
        for _ in range(30):   # history: server 0 answers in ~1 ms
            health.answered(0, 0.001)
        time.sleep(0.02)
        comp.keep_time()
        sent = rings.submitted()
        assert [c for c, _ in sent] == [1], "one hedge, to the other replica"
        comp.keep_time()
        assert rings.submitted() == [], "never a second hedge for the same part"
        hedge_rid = sent[0][1]
        rings.comp.write(em.PREFIX.pack(1, 0), *_answer(model, batch, hedge_rid), kind=em.COMP_FRAME, timeout=1)
        rings.comp.write(em.PREFIX.pack(0, 0), *_answer(model, batch, 10), kind=em.COMP_FRAME, timeout=1)
        comp.drain()
        assert done == [batch], "finished once, by the hedge; the late original is ignored"
        assert comp.counters.hedges_sent == 1 and comp.counters.hedges_won == 1
    finally:
        rings.close()


def test_a_part_past_its_deadline_fails_naming_the_server_it_waited_for(model, instance):
    rings, comp, batch, done, _health = _replicated(model, instance)
    try:
        batch.deadline = time.perf_counter() - 0.001
        comp.keep_time()
        assert done == [batch]
        assert "waiting for embedding server 0" in batch.error
        from flexemr.wire.frame import ErrorCode

        assert batch.error_code == ErrorCode.DEADLINE_EXCEEDED
    finally:
        rings.close()


def test_without_hedging_a_part_stuck_far_past_its_servers_latency_is_rescued_by_a_replica(model, instance,
                                                                                           monkeypatch):
    from flexemrd.inference import completions

    monkeypatch.setattr(completions, "RESCUE_MIN_S", 0.02)
    rings, comp, batch, done, health = _replicated(model, instance, hedging=False)
    try:
        comp.keep_time()
        assert rings.submitted() == [], "not before RESCUE_MIN_S"
        time.sleep(0.03)
        comp.keep_time()
        sent = rings.submitted()
        assert [c for c, _ in sent] == [1]
        comp.keep_time()
        assert rings.submitted() == [], "one rescue per part"
        rings.comp.write(em.PREFIX.pack(1, 0), *_answer(model, batch, sent[0][1]), kind=em.COMP_FRAME, timeout=1)
        comp.drain()
        assert done == [batch] and batch.error is None
        assert comp.counters.reissued == 1 and comp.counters.hedges_sent == 0 and comp.counters.hedges_won == 0
    finally:
        rings.close()


def test_a_reissued_copy_asks_for_exactly_what_the_first_send_asked_for(model, instance):
    """A copy sent after a lost connection carries the first send's partials precision (fp16 flag),
    id width (int32), model version and deadline flag: only its request id and time budget differ,
    so the answer does not depend on which replica ends up serving the part."""
    from flexemrd.inference.health import ServerHealth
    from flexemrd.inference.stats import FailoverCounters

    rings = _Rings(instance)
    try:
        routing = RoutingTable.build(model.spec, 2, "rows", replicas=2)
        connections = {0: (0, "a:1"), 1: (1, "b:1")}
        health = ServerHealth(routing, connections)
        submitter = Submitter(rings.sub, connections, {0: 0, 1: 1})
        pending = PendingTable()
        lookups = LookupEncoder(model.spec, partials="fp16")
        stats = ServiceStats(len(model.spec.tables))
        inflight = threading.BoundedSemaphore(1)
        done: list[Batch] = []
        batcher = Batcher(model.spec, routing, submitter, pending, done.append, lambda *a: None, stats, inflight,
                          256, 0.0, health=health, lookups=lookups)
        comp = Completions([rings.comp], rings.bell, pending, done.append, health, submitter, FailoverCounters(),
                           30.0, lookups)
        work = _work(model, Replies(), 1, 8, seed=4, predict=False)
        # int64 ids (as a client may send them): only the encoder's narrowing can make them int32 on the wire
        work.tables = {t: (v.astype(np.int64), ln) for t, (v, ln) in work.tables.items()}
        inflight.acquire()
        batcher._dispatch([work])
        first = rings.frames()
        assert first and not done
        lost = first[0][0]
        rings.comp.write(em.PREFIX.pack(lost, 0), b"connection lost: reset", kind=em.COMP_LOST, timeout=1)
        comp.drain()
        copies = rings.frames()
        originals = [f for f in first if f[0] == lost]
        assert len(copies) == len(originals) and {c for c, _h, _p in copies} == {1 - lost}

        def asked(h, payload: bytes):
            req = codec.decode_lookup(memoryview(payload), h.flags)
            assert req.budget_us > 0
            # everything but the request id and the deadline budget (the last 8 bytes without a credit trailer)
            return h.type, h.flags, h.aux, payload[:-8]

        assert codec.partials_of_flags(originals[0][1].flags) == "fp16"
        assert sorted(asked(h, p) for _c, h, p in copies) == sorted(asked(h, p) for _c, h, p in originals)
        for _c, h, p in copies:
            req = codec.decode_lookup(memoryview(p), h.flags)
            assert req.kjt.values.dtype == np.int32, "ids as int32, as first sent"
    finally:
        rings.close()
