"""The completion thread reads COMP_REF partials where they landed (zero-copy responses).

Real rings in shared memory: a "response ring" standing for a server's shm
response ring (the partial written into it once, lent by its consumer as the
engine does), the completion ring carrying only the reference.  The batch must
come out exact, the lend must be given back by the drain (so the server can
write again), and a reference whose ring is gone must send its part again
(like a part on a lost connection) instead of reading stale memory.
"""

from __future__ import annotations

import numpy as np

from flexemr import enginemsg as em
from flexemr import naming
from flexemr.ring import Doorbell, Ring
from flexemr.routing.table import RoutingTable
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, FrameType, pack_header_into
from flexemrd.inference.batch import Batch, Part
from flexemrd.inference.pending import PendingTable
from tests.flexemrd.test_inference_units import Replies, _completions, _server_partials, _work, model  # noqa: F401 (fixture)


def _land(rsp: Ring, frame: list) -> tuple[int, int, int]:
    """Write ``frame``'s payload into ``rsp`` as a server would, lend it as the engine does: (seq, pos, n)."""
    payload = b"".join(bytes(memoryview(b).cast("B")) for b in frame[1:])
    assert rsp.write(payload, timeout=1)
    msg = rsp.peek()
    seq, pos = rsp.lend(msg, 0, len(payload))
    msg.release()
    return seq, pos, len(payload)


def _ref(cid: int, rid: int, name: str, ino: int, seq: int, pos: int, n: int) -> bytes:
    out = bytearray(em.PREFIX_SIZE + HEADER_SIZE + em.REF_SIZE)
    em.PREFIX.pack_into(out, 0, cid, 0)
    pack_header_into(out, em.PREFIX_SIZE, FrameType.LOOKUP_RESP, rid, n, 0, 0)
    em.REF.pack_into(out, em.PREFIX_SIZE + HEADER_SIZE, ino, seq, pos)
    return bytes(out) + name.encode("ascii")


def test_partials_are_read_where_they_landed_and_the_space_is_given_back(model, instance):
    bell = Doorbell.create(naming.doorbell_name(instance, "t"))
    comp_ring = Ring.create(naming.shm_name(instance, "ring", "comp"), 1 << 20, doorbell=bell)
    rsp = Ring.create(naming.shm_name(instance, "shm", "s00", "c1x1d", "rsp"), 4 << 20)
    try:
        routing = RoutingTable.build(model.spec, 3)
        work = _work(model, Replies(), 1, 300, seed=5, predict=False)
        tables = sorted(work.tables)
        batch = Batch(1, [work], model.spec, tables, [work.tables[t][1] for t in tables])
        pending = PendingTable()
        done: list[Batch] = []
        comp = _completions(model, [comp_ring], bell, pending, done.append, routing,
                            {s: (s, f"srv{s}") for s in range(3)})
        for server in range(3):
            part, _ = _server_partials(model, routing, work, server)
            batch.expect(100 + server, Part(server, server, server, part.tables, part.lengths, part.values, part.rows))
        pending.add_lookups(batch, [100, 101, 102])
        for server in range(3):
            part, pooled = _server_partials(model, routing, work, server)
            frame = codec.encode_lookup_response(100 + server, np.array(part.tables, "<u4"), pooled)
            seq, pos, n = _land(rsp, frame)
            assert n >= em.REF_MIN_PAYLOAD
            msg = _ref(server, 100 + server, rsp.name, rsp.ino, seq, pos, n)
            assert comp_ring.write(msg, kind=em.COMP_REF, timeout=1)
            assert len(msg) < 200, "the completion ring carries the reference, not the partial"
        assert rsp.lends_outstanding() == 3
        assert comp.drain() == 3
        assert done == [batch] and batch.error is None
        assert rsp.lends_outstanding() == 0, "the drain gave every lend back"
        assert comp.landing.bytes_read == rsp.lent_bytes()
        got = batch.pooled()
        want = model.lookup({model.spec.tables[t].name: work.tables[t] for t in tables})
        for t in tables:
            np.testing.assert_allclose(got[t], want[model.spec.tables[t].name], rtol=1e-5, atol=1e-5)
    finally:
        for r in (comp_ring, rsp):
            r.close()
            r.unlink()
        bell.close()
        bell.unlink()


def test_a_reference_into_a_ring_that_is_gone_sends_its_part_again(model, instance):
    bell = Doorbell.create(naming.doorbell_name(instance, "t"))
    comp_ring = Ring.create(naming.shm_name(instance, "ring", "comp"), 1 << 20, doorbell=bell)
    sub = Ring.create(naming.shm_name(instance, "ring", "sub"), 1 << 20)
    rsp = Ring.create(naming.shm_name(instance, "shm", "s00", "c1x2d", "rsp"), 4 << 20)
    try:
        routing = RoutingTable.build(model.spec, 1)
        work = _work(model, Replies(), 1, 300, seed=6, predict=False)
        tables = sorted(work.tables)
        batch = Batch(1, [work], model.spec, tables, [work.tables[t][1] for t in tables])
        pending = PendingTable()
        done: list[Batch] = []
        comp = _completions(model, [comp_ring], bell, pending, done.append, routing, {0: (0, "srv0")},
                            sub_rings=[sub])
        part, pooled = _server_partials(model, routing, work, 0)
        batch.expect(7, Part(0, 0, 0, part.tables, part.lengths, part.values, part.rows))
        pending.add_lookups(batch, [7])
        seq, pos, n = _land(rsp, codec.encode_lookup_response(7, np.array(part.tables, "<u4"), pooled))
        name, ino = rsp.name, rsp.ino
        rsp.unlink()   # the server died and its successor swept its rings before the ranker got there
        assert comp_ring.write(_ref(0, 7, name, ino, seq, pos, n), kind=em.COMP_REF, timeout=1)
        comp.drain()
        assert done == [] and batch.error is None, "the part is still owed: sent again, not failed"
        resent = sub.peek()
        assert resent is not None and resent.kind == em.SUB_FRAME
        assert em.PREFIX.unpack_from(resent.data, 0)[0] == 0, "re-issued on the server's connection"
        resent.release()
        assert comp.counters.reissued == 1
        assert comp.landing.unavailable == 1 and len(comp.landing) == 0
    finally:
        for r in (comp_ring, sub, rsp):
            r.close()
            r.unlink()
        bell.close()
        bell.unlink()
