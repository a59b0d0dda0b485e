"""Answers pooled straight into the clients' reply slots (Batch(place=True), SocketReplies.place_pooled).

Real pieces: the client's sealed memfd region (flexemr.client_shm), the ranker's mapping of it
(reply_region.map_region), the session's SocketReplies over a socketpair, the finisher.  The partials go
into the slot as they arrive; the finisher then sends only a descriptor, and what the client reads there
is the same answer the batch-buffer path sends by frame.
"""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

from flexemr.client_shm import ReplyRegion
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.routing.combine import Accumulator
from flexemr.types import Interaction, Pooling
from flexemr.wire import codec, replyslot
from flexemr.wire.frame import HEADER_SIZE, FrameType, unpack_header
from flexemr.wire.stream import recv_exact_into

from flexemrd.inference.admission import Work
from flexemrd.inference.batch import MAX_PLACED_WORKS, Batch, merge
from flexemrd.inference.finisher import Finisher
from flexemrd.inference.replies import SocketReplies
from flexemrd.inference.reply_region import RegionBudget, map_region
from flexemrd.inference.stats import ServiceStats

SPEC = ModelSpec(4, (8, 4), (8, 1), Interaction.DOT,
                 (TableSpec("a", 50, 4, Pooling.MEAN), TableSpec("b", 30, 3, Pooling.MAX)))


def _work(reply, rid: int, names: list[str], batch: int, rng: np.random.Generator) -> Work:
    tables = {}
    for n in names:
        t = SPEC.table_index(n)
        lengths = rng.integers(0, 4, batch).astype(np.int32)
        tables[t] = (rng.integers(0, SPEC.tables[t].rows, int(lengths.sum())).astype(np.int32), lengths)
    return Work(reply, rid, False, batch, tables, None, names)


def _recv_frame(sock: socket.socket):
    head = bytearray(HEADER_SIZE)
    recv_exact_into(sock, memoryview(head))
    h = unpack_header(bytes(head))
    body = bytearray(h.payload_len)
    recv_exact_into(sock, memoryview(body))
    return h, bytes(body)


@pytest.fixture
def session():
    """A client's region with its slots, the ranker's mapping of it and the replies of the session."""
    region = ReplyRegion(region_bytes=1 << 16, slots=2)
    mapped = map_region([os.dup(region.fd)], region.region_bytes, RegionBudget(1 << 20))
    ranker, client = socket.socketpair()
    replies = SocketReplies(ranker)
    replies.region = mapped
    yield region, mapped, replies, client
    mapped.close()
    ranker.close()
    client.close()
    region.close()


def _feed(batch: Batch, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Two servers' partials per table, one full and one compact, into the batch and into plain accumulators
    over the whole batch; returns the plain result per table."""
    want = {}
    for t in batch.tables:
        dim, pooling = SPEC.tables[t].dim, SPEC.tables[t].pooling
        lengths = np.concatenate([w.tables[t][1] if t in w.tables else np.zeros(w.batch, np.int32)
                                  for w in batch.works])
        plain = Accumulator(pooling, batch.size, dim, lengths)
        full = rng.standard_normal((batch.size, dim)).astype(np.float32)
        counts = rng.integers(0, 3, batch.size).astype(np.int32)
        rows = np.flatnonzero(rng.random(batch.size) < 0.5)
        compact = rng.standard_normal((len(rows), dim)).astype(np.float32)
        for acc in (plain, batch.acc[t]):
            acc.add(full, counts)
            acc.add(compact, np.ones(len(rows), np.int32), rows)
        want[t] = plain.result()
    return want


def test_a_placed_answer_is_pooled_in_the_slot_and_sent_as_a_descriptor(session):
    region, mapped, replies, client = session
    rng = np.random.default_rng(5)
    # Request 1 names the tables out of model order and has a slot; request 2 has no slot (its answer goes by
    # frame), and asks for one table only.
    w1, w2 = _work(replies, 1, ["b", "a"], 5, rng), _work(replies, 2, ["a"], 3, rng)
    slot = region.acquire()
    replies.name_slot(1, slot.offset, slot.capacity)
    tables = [0, 1]
    _values, lengths = merge([w1, w2], tables)
    batch = Batch(1, [w1, w2], SPEC, tables, lengths, version=4, place=True)
    assert batch.placed is not None and batch.placed[0] is not None and batch.placed[1] is None
    slot_bytes = np.asarray(region.lease(slot, slot.offset, slot.capacity))   # the client's view of its slot
    for t in tables:   # request 1's rows of every table are accumulated in the client's slot
        assert np.shares_memory(batch.outs[0][t], np.frombuffer(mapped._mmap, np.uint8))
    del slot_bytes
    want = _feed(batch, rng)

    Finisher(SPEC, None, "cpu", ServiceStats(2), threading.BoundedSemaphore(1)).answer(batch)

    h, body = _recv_frame(client)
    assert h.type == FrameType.CLIENT_LOOKUP_RESP and h.request_id == 1 and h.flags & replyslot.REPLY_SLOT
    offset, nbytes = replyslot.decode_descriptor(body)
    payload = region.lease(slot, offset, nbytes)
    assert codec.pooled_version(payload) == 4
    got = codec.decode_pooled(payload)
    assert list(got) == ["b", "a"]
    np.testing.assert_array_equal(got["a"], want[0][:5])
    np.testing.assert_array_equal(got["b"], want[1][:5])

    h, body = _recv_frame(client)
    assert h.type == FrameType.CLIENT_LOOKUP_RESP and h.request_id == 2 and not h.flags & replyslot.REPLY_SLOT
    got = codec.decode_pooled(body)
    np.testing.assert_array_equal(got["a"], want[0][5:])


def test_the_layout_is_what_encode_pooled_sends():
    rng = np.random.default_rng(1)
    pooled = [rng.standard_normal((3, d)).astype(np.float32) for d in (5, 2, 7)]
    names = ["x", "long_name", "z"]
    frame = codec.encode_pooled(9, names, pooled, version=2)
    blob = b"".join(bytes(memoryview(b).cast("B")) for b in frame[1:])
    head, offsets, size = codec.pooled_layout(names, [5, 2, 7], 3, version=2)
    assert size == len(blob) and blob.startswith(head)
    for o, p in zip(offsets, pooled):
        assert blob[o : o + p.nbytes] == p.tobytes()
    assert frame[0] == codec.pooled_header(9, size, version=2)


def test_answers_that_cannot_be_placed_take_the_batch_buffer(session):
    region, _mapped, replies, _client = session
    rng = np.random.default_rng(2)
    slot = region.acquire()
    # Too many requests for one batch to place: the plain accumulators, slots left as named.
    works = [_work(replies, i, ["a"], 1, rng) for i in range(MAX_PLACED_WORKS + 1)]
    replies.name_slot(0, slot.offset, slot.capacity)
    _values, lengths = merge(works, [0])
    assert Batch(1, works, SPEC, [0], lengths, place=True).placed is None
    # An answer larger than its slot goes by frame; the slot stays named for that.
    big = _work(replies, 0, ["a", "b"], 4000, rng)
    _values, lengths = merge([big], [0, 1])
    assert Batch(2, [big], SPEC, [0, 1], lengths, place=True).placed is None
    assert replies._slots == {0: (slot.offset, slot.capacity)}


def test_a_client_gone_while_its_answer_is_pooled_in_place_faults_nothing(session):
    region, mapped, replies, client = session
    rng = np.random.default_rng(3)
    w = _work(replies, 7, ["a", "b"], 6, rng)
    slot = region.acquire()
    replies.name_slot(7, slot.offset, slot.capacity)
    _values, lengths = merge([w], [0, 1])
    batch = Batch(1, [w], SPEC, [0, 1], lengths, place=True)
    mapped.close()       # the session ends (client disconnected): the mapping must outlive the placed arrays
    _feed(batch, rng)    # still writable: no SIGSEGV
    client.close()
    replies.alive = False
    Finisher(SPEC, None, "cpu", ServiceStats(2), threading.BoundedSemaphore(1)).answer(batch)
