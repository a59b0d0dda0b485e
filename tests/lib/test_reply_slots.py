"""Shared-memory replies, the parts that need no daemon: slots and leases, layouts, mapping a region, fd passing.

Real memfds, real mappings and real socket pairs; the end-to-end behaviour is in
tests/integration/test_shm_replies.py.
"""

from __future__ import annotations

import fcntl
import gc
import os
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.client_shm import ReplyRegion
from flexemr.errors import ProtocolError
from flexemr.wire import codec, replyslot
from flexemr.wire.frame import FrameType, pack_header, unpack_header
from flexemr.wire.stream import FrameReader, send_buffers

from flexemrd.inference.reply_region import MappedRegion, RegionBudget, RegionRefused, map_region


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _answer_into(region: ReplyRegion, slot, names, arrays) -> memoryview:
    """What the ranker does, without one: write the answer into ``slot`` through a second mapping."""
    frame = codec.encode_pooled(7, names, arrays)
    fd = os.dup(region.fd)
    mapped = map_region([fd], region.region_bytes, RegionBudget(1 << 30))
    try:
        assert mapped.write(slot.offset, slot.capacity, frame)
    finally:
        mapped.close()
    return region.lease(slot, slot.offset, replyslot.payload_bytes(frame))


# ---------------------------------------------------------------- slots and leases


def test_slots_are_disjoint_and_run_out_without_blocking():
    r = ReplyRegion(64 << 10, 4)
    slots = [r.acquire() for _ in range(4)]
    assert r.acquire() is None          # every slot named: the caller uses a normal frame
    spans = sorted((s.offset, s.offset + s.capacity) for s in slots)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert spans[0][0] == 0 and spans[-1][1] <= r.region_bytes
    r.release(slots[2])
    assert r.acquire() is slots[2]
    r.close()


def test_a_slot_stays_leased_until_the_last_array_from_it_is_garbage():
    r = ReplyRegion(64 << 10, 2)
    slot = r.acquire()
    t0 = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = codec.decode_pooled(_answer_into(r, slot, ["a", "b"], [t0, -t0]))
    np.testing.assert_array_equal(out["a"], t0)
    np.testing.assert_array_equal(out["b"], -t0)
    assert r.leased_slots == 1 and r.free_slots == 1
    keep = out["b"][1:]          # a view of a view: it alone keeps the slot
    del out
    gc.collect()
    assert r.leased_slots == 1
    np.testing.assert_array_equal(keep, -t0[1:])
    del keep
    assert r.leased_slots == 0 and r.free_slots == 2     # refcounting frees it at once, no gc needed
    r.close()


def test_leased_memory_outlives_the_client_region_object():
    r = ReplyRegion(64 << 10, 1)
    slot = r.acquire()
    t0 = np.full((2, 3), 5.0, np.float32)
    arr = codec.decode_pooled(_answer_into(r, slot, ["a"], [t0]))["a"]
    r.close()
    del r
    gc.collect()
    np.testing.assert_array_equal(arr, t0)   # the mapping lives as long as the array


def test_a_descriptor_outside_the_named_slot_is_refused():
    r = ReplyRegion(64 << 10, 2)
    slot = r.acquire()
    with pytest.raises(ValueError, match="named slot"):
        r.lease(slot, slot.offset + 8, 16)
    with pytest.raises(ValueError, match="named slot"):
        r.lease(slot, slot.offset, slot.capacity + 1)
    r.close()


def test_bad_region_sizes_name_the_argument():
    with pytest.raises(ValueError, match="reply_slots"):
        ReplyRegion(1 << 20, 0)
    with pytest.raises(ValueError, match="reply_region_bytes"):
        ReplyRegion(4096, 2)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["acquire", "lease", "drop", "release"]), st.integers(0, 7)),
                    max_size=40), nslots=st.integers(1, 5))
def test_live_slots_never_overlap_and_every_one_comes_back(ops, nslots):
    r = ReplyRegion(nslots * 4096, nslots)
    named, leased = [], []
    for op, k in ops:
        if op == "acquire":
            s = r.acquire()
            assert (s is None) == (len(named) + len(leased) == nslots)
            if s is not None:
                assert all(s.index != o.index for o, _ in leased) and all(s.index != o.index for o in named)
                named.append(s)
        elif op == "lease" and named:
            s = named.pop(k % len(named))
            leased.append((s, np.frombuffer(r.lease(s, s.offset, min(s.capacity, 64)), np.uint8)))
        elif op == "drop" and leased:
            leased.pop(k % len(leased))
        elif op == "release" and named:
            r.release(named.pop(k % len(named)))
        assert r.free_slots == nslots - len(named) - len(leased)
    for s in named:
        r.release(s)
    leased.clear()
    assert r.free_slots == nslots and r.leased_slots == 0
    r.close()


# ---------------------------------------------------------------- layouts


def _client_frame(batch: int, dims: list[int], seed: int) -> list:
    rng = np.random.default_rng(seed)
    names = [f"t{i}" for i in range(len(dims))]
    lengths = [rng.integers(0, 3, batch).astype(np.int32) for _ in dims]
    values = [rng.integers(0, 100, int(ln.sum())).astype(np.int64) for ln in lengths]
    dense = rng.standard_normal((batch, 3)).astype(np.float32)
    return codec.encode_client_request(5, names, lengths, values, batch, dense, timeout_ms=40)


@settings(max_examples=50, deadline=None)
@given(batch=st.integers(0, 9), dims=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 99),
       offset=st.integers(0, 2**40).map(lambda x: x * 8), capacity=st.integers(1, 2**50))
def test_slot_trailer_round_trips_and_leaves_the_request_intact(batch, dims, seed, offset, capacity):
    frame = _client_frame(batch, dims, seed)
    flagged = replyslot.add_slot_trailer(frame, offset, capacity)
    wire = b"".join(bytes(b) for b in flagged)
    h = unpack_header(wire)
    assert h.flags & replyslot.REPLY_SLOT and h.aux == 40 and h.payload_len == len(wire) - 32
    payload, off, cap = replyslot.split_slot_trailer(memoryview(wire)[32:])
    assert (off, cap) == (offset, capacity)
    plain = b"".join(bytes(b) for b in frame)
    assert bytes(payload) == plain[32:]
    req = codec.decode_client_request(payload, FrameType.PREDICT)
    assert req.batch == batch


@settings(max_examples=50, deadline=None)
@given(batch=st.integers(0, 6), dims=st.lists(st.integers(1, 6), min_size=1, max_size=4), version=st.integers(0, 9),
       slot=st.integers(0, 3))
def test_an_answer_written_into_a_slot_decodes_like_the_frame(batch, dims, version, slot):
    rng = np.random.default_rng(batch * 31 + len(dims))
    names = [f"n{i}" for i in range(len(dims))]
    arrays = [rng.standard_normal((batch, d)).astype(np.float32) for d in dims]
    frame = codec.encode_pooled(9, names, arrays, version)
    region = np.zeros(4 * 8192, np.uint8)
    offset = slot * 8192
    n = replyslot.write_payload(frame, region[offset : offset + 8192])
    assert n == replyslot.payload_bytes(frame)
    desc = replyslot.encode_descriptor(frame, offset)
    h = unpack_header(desc[0])
    assert h.type == FrameType.CLIENT_LOOKUP_RESP and h.flags & replyslot.REPLY_SLOT and h.request_id == 9
    off, nbytes = replyslot.decode_descriptor(desc[1])
    body = memoryview(region)[off : off + nbytes]
    assert codec.pooled_version(body) == version
    got = codec.decode_pooled(body)
    for name, a in zip(names, arrays):
        np.testing.assert_array_equal(got[name], a)
    scores = rng.standard_normal(batch).astype(np.float32)
    sframe = codec.encode_scores(3, scores, version)
    replyslot.write_payload(sframe, region[offset : offset + 8192])
    sh = unpack_header(replyslot.encode_descriptor(sframe, offset)[0])
    np.testing.assert_array_equal(codec.decode_scores(region[offset : offset + replyslot.payload_bytes(sframe)],
                                                      sh.flags), scores)


def test_bad_slots_and_descriptors_name_what_is_wrong():
    with pytest.raises(ProtocolError, match="past the end of the 65536-byte reply region"):
        replyslot.check_slot(65536, 8, 65536)
    with pytest.raises(ProtocolError, match="past the end"):
        replyslot.check_slot(8, 2**64 - 1, 65536)
    with pytest.raises(ProtocolError, match="not a multiple of 8"):
        replyslot.check_slot(4, 8, 65536)
    with pytest.raises(ProtocolError, match="capacity is 0"):
        replyslot.check_slot(0, 0, 65536)
    with pytest.raises(ProtocolError, match="too short"):
        replyslot.split_slot_trailer(memoryview(bytes(8)))
    with pytest.raises(ProtocolError, match="slot descriptor"):
        replyslot.decode_descriptor(bytes(8))
    with pytest.raises(ProtocolError, match="region_bytes"):
        replyslot.decode_region(bytes(4))


# ---------------------------------------------------------------- the ranker mapping a region


def _memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_map_region_refuses_bad_descriptors_and_closes_every_one():
    budget = RegionBudget(1 << 20)
    before = _open_fds()
    r, w = os.pipe()
    cases = [
        ([], 65536, "exactly one file descriptor"),
        ([r], 65536, "not a memfd"),
        ([_memfd(65536, seals=0)], 65536, "not sealed against shrinking"),
        ([_memfd(65536)], 131072, "says 131072 bytes but the memfd has 65536"),
        ([_memfd(1024)], 1024, "too small"),
        ([_memfd(2 << 20)], 2 << 20, r"limit of 1048576 bytes .*max_reply_region_bytes"),
        ([_memfd(65536), _memfd(65536)], 65536, "exactly one"),
    ]
    for fds, declared, why in cases:
        with pytest.raises(RegionRefused, match=why):
            map_region(fds, declared, budget)
    os.close(w)
    assert _open_fds() == before
    assert budget.used == 0


def test_regions_count_against_the_budget_until_closed_and_never_fault_on_a_shrink():
    budget = RegionBudget(200 << 10)
    fd = _memfd(128 << 10)
    m = map_region([os.dup(fd)], 128 << 10, budget)
    assert isinstance(m, MappedRegion) and budget.used == 128 << 10
    with pytest.raises(RegionRefused, match="limit") as e:
        map_region([os.dup(fd)], 128 << 10, budget)
    assert e.value.overloaded
    with pytest.raises(OSError):
        os.ftruncate(fd, 4096)          # sealed: the client cannot pull the pages from under the ranker
    frame = codec.encode_scores(1, np.ones(1000, np.float32))
    assert m.write(4096, 8192, frame)
    assert not m.write(4096, 100, frame)   # does not fit: the caller sends the frame
    m.close()
    assert budget.used == 0 and not m.write(4096, 8192, frame)
    m.close()                              # idempotent
    os.close(fd)


# ---------------------------------------------------------------- passing the descriptor


def test_a_frame_reader_over_the_catcher_gets_the_fd_and_bounds_the_rest():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        catcher = replyslot.FdCatchingSocket(b)
        reader = FrameReader(catcher, 1 << 20, frame_timeout_s=5.0)   # type: ignore[arg-type]
        send_buffers(a, [pack_header(FrameType.PING, 1, 0)])
        fd = _memfd(65536)
        replyslot.send_with_fd(a, replyslot.encode_region(2, 65536), fd)
        os.close(fd)
        h = reader.read_header()
        assert h.type == FrameType.PING and not catcher.fds
        h = reader.read_header()
        assert h.type == FrameType.REPLY_REGION
        assert replyslot.decode_region(reader.read_payload_growing(h)) == 65536
        fds = catcher.take_fds()
        assert len(fds) == 1 and os.fstat(fds[0]).st_size == 65536
        os.close(fds[0])
        before = _open_fds()
        for i in range(20):      # a peer attaching a descriptor to every byte
            p = os.open("/dev/null", os.O_RDONLY)
            a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array([p], np.int32).tobytes())])
            os.close(p)
        buf = bytearray(1)
        for _ in range(20):
            catcher.recv_into(memoryview(buf), 1)
        assert len(catcher.fds) == replyslot.MAX_FDS_PER_READ
        for f in catcher.take_fds():
            os.close(f)
        assert _open_fds() == before
    finally:
        a.close()
        b.close()
