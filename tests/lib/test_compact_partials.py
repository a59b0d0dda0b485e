"""Compact partials (protocol 3): only bags with ids for a server travel, and the answer is scattered back.

The full path pools every bag of the batch on every server that holds rows of
the table; the compact path (``split_batch``) leaves out, per server and
table, the bags that have no ids there: empty bags, bags whose ids all live
on other shards, bags whose ids all hit the ranker's cache.  These
properties run the compact path through the real codec (LOOKUP encode ->
decode -> pool -> LOOKUP_RESP encode -> decode -> ``Accumulator`` scatter),
with a cache-like share of every bag's ids pooled on the ranker, and check it
against pooling each whole bag (every pooling mode, tables split over
servers, zero-length bags included).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.errors import ProtocolError
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.pooling import pool_reference
from flexemr.routing import RoutingTable, split_batch
from flexemr.routing.combine import Accumulator
from flexemr.types import Interaction, Pooling
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, unpack_header

RTOL, ATOL = 1e-5, 1e-5


def _payload(frame: list) -> tuple:
    blob = b"".join(bytes(memoryview(b).cast("B")) for b in frame)
    return unpack_header(blob[:HEADER_SIZE]), blob[HEADER_SIZE:]


def _server_mode(p: Pooling) -> Pooling:
    return Pooling.MAX if p is Pooling.MAX else Pooling.SUM


@st.composite
def cases(draw):
    n_tables = draw(st.integers(1, 3))
    tables = [TableSpec(f"t{i}", rows=draw(st.integers(1, 60)), dim=draw(st.integers(1, 4)),
                        pooling=draw(st.sampled_from(list(Pooling)))) for i in range(n_tables)]
    spec = ModelSpec(dense_features=1, bottom_mlp=(4,), top_mlp=(1,), interaction=Interaction.CAT,
                     tables=tuple(tables))
    routing = RoutingTable.build(spec, draw(st.integers(1, 4)), draw(st.sampled_from(["rows", "tables"])))
    batch = draw(st.integers(1, 9))
    sparse, hit_frac = {}, draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    for t in tables:
        lens = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3, 7]), min_size=batch, max_size=batch))
        ids = draw(st.lists(st.integers(0, t.rows - 1), min_size=sum(lens), max_size=sum(lens)))
        sparse[t.name] = (np.array(ids, np.int64), np.array(lens, np.int32))
    seed = draw(st.integers(0, 2**16))
    return spec, routing, batch, sparse, hit_frac, seed


def _hits(rng: np.random.Generator, values: np.ndarray, lengths: np.ndarray, frac: float):
    """Split a table's ids like the cache does: (hit values, hit counts [B], miss values, miss lengths [B])."""
    hit = rng.random(len(values)) < frac
    bag = np.repeat(np.arange(len(lengths)), lengths)
    hit_counts = np.bincount(bag[hit], minlength=len(lengths)).astype(np.int32)
    return values[hit], hit_counts, values[~hit], (lengths - hit_counts).astype(np.int32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_compact_subrequests_and_scatter_equal_pooling_whole_bags(case):
    spec, routing, batch, sparse, hit_frac, seed = case
    rng = np.random.default_rng(seed)
    data = {t.name: rng.standard_normal((t.rows, t.dim)).astype(np.float32) for t in spec.tables}
    tidx = list(range(len(spec.tables)))
    acc, miss_v, miss_l = {}, [], []
    for i, t in enumerate(spec.tables):
        v, ln = sparse[t.name]
        acc[i] = Accumulator(t.pooling, batch, t.dim, ln)
        hv, hc, mv, ml = _hits(rng, v, ln, hit_frac)
        if len(hv):   # the cache's partial: every bag of the batch, like before
            acc[i].add(pool_reference(data[t.name], hv, hc, _server_mode(t.pooling)), hc)
        miss_v.append(mv)
        miss_l.append(ml)
    plan = split_batch(routing, batch, tidx, miss_v, miss_l)
    sent = 0
    for server, part in plan.parts.items():
        frame = codec.encode_lookup(7, batch, part.tables, part.lengths, part.values, narrow_ids=True)
        h, payload = _payload(frame)
        req = codec.decode_lookup(payload, h.flags)
        pooled = []
        for k, t in enumerate(part.tables):
            values, lengths = req.kjt.table(k)
            assert req.kjt.bags(k) == len(part.lengths[k])
            assert (lengths > 0).all(), "a bag without ids for this server travelled"
            pooled.append(pool_reference(data[spec.tables[t].name], values, lengths,
                                         _server_mode(spec.tables[t].pooling)))
        h, payload = _payload(codec.encode_lookup_response(7, req.table_ids, pooled, batch=batch))
        assert len(payload) == codec.lookup_response_size([len(p) for p in pooled], [p.shape[1] for p in pooled])
        _tids, partials = codec.decode_lookup_response(payload)
        for t, p, cnt, rows in zip(part.tables, partials, part.lengths, part.rows):
            acc[t].add(p, cnt, rows)
            sent += len(p)
    # What travelled: at most one partial per (bag, table, server) that had ids there.
    needed = sum(int((np.asarray(ln) > 0).sum()) for ln in miss_l)
    assert sent >= needed
    if all(len(routing.servers_of_table(t)) == 1 for t in tidx):
        assert sent == needed
    for i, t in enumerate(spec.tables):
        v, ln = sparse[t.name]
        want = pool_reference(data[t.name], v, ln, t.pooling)
        np.testing.assert_allclose(acc[i].result(), want, rtol=RTOL, atol=ATOL, err_msg=f"{t.name} {t.pooling}")


def test_a_batch_whose_ids_all_hit_has_no_subrequest():
    spec = ModelSpec(dense_features=1, bottom_mlp=(4,), top_mlp=(1,), interaction=Interaction.CAT,
                     tables=(TableSpec("a", 10, 2, Pooling.SUM), TableSpec("b", 10, 2, Pooling.MEAN)))
    routing = RoutingTable.build(spec, 2, "rows")
    empty = [np.zeros(0, np.int64)] * 2
    plan = split_batch(routing, 4, [0, 1], empty, [np.zeros(4, np.int32)] * 2)
    assert plan.parts == {}


def test_only_the_bags_with_ids_for_a_server_travel_to_it():
    spec = ModelSpec(dense_features=1, bottom_mlp=(4,), top_mlp=(1,), interaction=Interaction.CAT,
                     tables=(TableSpec("a", 10, 2, Pooling.SUM),))
    routing = RoutingTable.build(spec, 2, "rows")      # rows [0, 5) on server 0, [5, 10) on server 1
    values = np.array([1, 2, 7, 8, 9], np.int64)
    lengths = np.array([2, 0, 3, 0], np.int32)         # bag 0 on server 0, bag 2 on server 1
    plan = split_batch(routing, 4, [0], [values], [lengths])
    assert [p.rows[0].tolist() for p in plan.parts.values()] == [[0], [2]]
    assert [p.lengths[0].tolist() for p in plan.parts.values()] == [[2], [3]]
    assert sum(p.bags_sent() for p in plan.parts.values()) == 2     # not 2 servers x 4 bags


def test_a_compact_lookup_claiming_more_bags_than_its_batch_is_refused_by_name():
    frame = codec.encode_lookup(1, 3, [0], [np.array([1, 2], np.int32)], [np.array([4, 5, 6], np.int64)])
    h, payload = _payload(frame)
    assert codec.decode_lookup(payload).kjt.bags(0) == 2
    bad = bytearray(payload)
    bad[0:4] = (1).to_bytes(4, "little")               # B = 1, but table 0 says 2 bags
    with pytest.raises(ProtocolError, match="carries 2 bags, more than the batch of 1"):
        codec.decode_lookup(bytes(bad))
    with pytest.raises(ValueError, match="more than its batch"):
        codec.encode_lookup(1, 1, [0], [np.array([1, 2], np.int32)], [np.array([4, 5, 6], np.int64)])


def test_a_peer_of_protocol_2_is_refused_with_the_versions_named():
    frame = codec.encode_lookup(1, 1, [0], [np.array([1], np.int32)], [np.array([4], np.int64)])
    head = bytearray(bytes(frame[0]))
    head[4:6] = (2).to_bytes(2, "little")
    with pytest.raises(ProtocolError, match="protocol version 2 not supported .this peer speaks 3"):
        unpack_header(bytes(head))


def test_client_frames_stay_version_2_so_clients_and_rankers_upgrade_in_either_order():
    """Protocol 3 changed only the ranker <-> server LOOKUP: a client's frames are sent and accepted as 2."""
    from flexemr.wire.frame import CLIENT_VERSION, VERSION, FrameType, pack_header

    def version_of(head: bytes) -> int:
        return int.from_bytes(head[4:6], "little")

    for t in (FrameType.PREDICT, FrameType.CLIENT_LOOKUP, FrameType.PREDICT_RESP, FrameType.CLIENT_LOOKUP_RESP,
              FrameType.ERROR, FrameType.PING, FrameType.PONG):
        head = pack_header(t, 7, 0)
        assert version_of(head) == CLIENT_VERSION == 2, t.name
        assert unpack_header(head).type == t                      # read by a new peer
        v3 = bytearray(head)
        v3[4:6] = VERSION.to_bytes(2, "little")
        assert unpack_header(bytes(v3)).type == t                 # and as 3 (nothing in them changed)
    for t in (FrameType.HELLO, FrameType.LOOKUP, FrameType.LOOKUP_RESP, FrameType.FETCH, FrameType.CREDIT):
        head = bytearray(pack_header(t, 7, 0))
        assert version_of(head) == VERSION == 3, t.name
        head[4:6] = (2).to_bytes(2, "little")                     # an embedding server or ranker of protocol 2
        with pytest.raises(ProtocolError, match="protocol version 2 not supported"):
            unpack_header(bytes(head))
