"""The RDMA landing's ring arithmetic and counters (rdma/landing.py), on the host: no device needed.

The server places each chunk by ``place`` within ``room``; the engine replays
``place`` to find it; ``Landing.reclaim`` (read position held back by lends the
ranker's Borrower has not returned, in any order) is what the engine grants.
A model sender/receiver pair driven by hypothesis checks that no chunk is ever
written over bytes still unread or lent, and that everything is delivered.
"""

from __future__ import annotations

import collections
import os
import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr import naming
from flexemr.ring import Borrower
from flexemr.transport.rdma import landing as lmod
from flexemr.transport.rdma.landing import Landing, max_chunk, place, room

CAP = 4096


@given(head=st.integers(0, 1 << 40), n=st.integers(1, CAP // 2))
def test_place_is_contiguous_aligned_and_never_behind_head(head: int, n: int) -> None:
    start, nxt = place(head, n, CAP)
    assert start >= head and start % CAP + n <= CAP          # one piece, never across the end
    assert start == head or start % CAP == 0                  # in place, or wrapped to offset 0
    assert nxt % 64 == 0 and nxt >= start + n and nxt - (start + n) < 64


@given(head=st.integers(0, 1 << 30), free=st.integers(-CAP, CAP))
def test_room_is_exactly_the_largest_chunk_that_fits(head: int, free: int) -> None:
    limit = head + free
    r = room(head, limit, CAP)
    assert 0 <= r <= max_chunk(CAP)
    if r:
        assert place(head, r, CAP)[0] + r <= limit
    if r < max_chunk(CAP):
        assert r + 1 > max_chunk(CAP) or place(head, r + 1, CAP)[0] + r + 1 > limit


def test_a_chunk_larger_than_half_the_ring_is_refused_with_its_size() -> None:
    with pytest.raises(ValueError, match="chunk of 2049 bytes"):
        place(0, 2049, CAP)


@pytest.fixture
def instance() -> str:
    inst = f"t{uuid.uuid4().hex[:10]}"
    yield inst
    naming.unlink_instance_segments(inst)


def _landing(instance: str, tag: str = "c0n0") -> Landing:
    return Landing(f"{lmod.landing_prefix(instance, 0)}.p{os.getpid()}.{tag}", CAP)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, CAP // 2), min_size=1, max_size=40),
       lend_mask=st.lists(st.booleans(), min_size=40, max_size=40),
       order=st.randoms(use_true_random=False))
def test_sender_and_receiver_never_overwrite_unread_or_lent_bytes(instance: str, sizes: list[int],
                                                                   lend_mask: list[bool], order) -> None:
    """A model of both ends: the sender writes chunks of ``sizes`` as the grants allow; the receiver
    reads some and lends others, the borrower returns lends in a shuffled order."""
    land = _landing(instance, f"c{uuid.uuid4().hex[:6]}")
    borrower = Borrower.attach(land.name)
    try:
        data = np.frombuffer(land.data, np.uint8)
        limit = CAP                       # the sender's grant
        granted = 0
        s_head = r_head = 0
        landed: collections.deque[tuple[int, int, int, int]] = collections.deque()   # start, n, next, tag
        lent: list[tuple[int, int, int, int]] = []                                  # seq, pos, n, tag
        pending = list(enumerate(sizes))
        done = 0
        for _ in range(10 * len(sizes) + 20):
            # sender: as many chunks as fit
            while pending and pending[0][1] <= room(s_head, limit, CAP):
                tag, n = pending.pop(0)
                start, s_head = place(s_head, n, CAP)
                data[start % CAP:start % CAP + n] = tag % 251 + 1
                landed.append((start, n, s_head, tag))
            # receiver: take one chunk (read, or lend it)
            if landed:
                start, n, nxt, tag = landed.popleft()
                r_start, r_head = place(r_head, n, CAP)
                assert r_start == start                          # the shared rule agrees
                land.land(r_head)
                assert (data[start % CAP:start % CAP + n] == tag % 251 + 1).all()   # nothing overwrote it
                if lend_mask[tag % len(lend_mask)]:
                    lent.append((land.lend(start, n), start, n, tag))
                else:
                    done += 1
                land.release_to(nxt)
            # borrower: return some lends, any order; lent bytes must still be intact
            order.shuffle(lent)
            for seq, pos, n, tag in lent[: order.randint(0, len(lent))]:
                view = borrower.view(seq, pos, n)
                assert view is not None and (np.frombuffer(view, np.uint8) == tag % 251 + 1).all()
                borrower.give_back(seq, pos + n)
                lent.remove((seq, pos, n, tag))
                done += 1
            borrower.flush()
            # engine: grant the reclaim's advances (it may dip below what was granted: never granted twice)
            delta = land.reclaim() - granted
            if delta > 0:
                granted += delta
                limit += delta
            if not pending and not landed and not lent:
                break
        assert done == len(sizes) and land.outstanding() == 0
    finally:
        borrower.close()
        land.close()


def test_a_closed_landing_waits_for_its_lends_then_leaves_nothing_in_dev_shm(instance: str, monkeypatch) -> None:
    monkeypatch.setattr(lmod, "_RETIRE_POLL_S", 0.02)
    land = _landing(instance)
    borrower = Borrower.attach(land.name)
    seq = land.lend(0, 100)
    land.release_to(128)
    before = lmod.retired()              # (hypothesis may have aborted examples with lends out)
    land.close()                         # the stream closed with a lend out: the segment stays
    assert lmod.retired() == before + 1 and os.path.exists(naming.SHM_DIR + land.name)
    assert borrower.view(seq, 0, 100) is not None
    borrower.give_back(seq, 100)
    borrower.flush()
    for _ in range(200):
        if not os.path.exists(naming.SHM_DIR + land.name):
            break
        time.sleep(0.02)
    borrower.close()
    assert not any(land.name.lstrip("/") in e for e in naming.list_instance_segments(instance))


def test_a_dead_engines_landings_are_swept_by_its_successor(instance: str) -> None:
    dead = os.fork()
    if dead == 0:
        Landing(f"{lmod.landing_prefix(instance, 3)}.p{os.getpid()}.c1n0", CAP)
        os._exit(0)                      # dies without unlinking, like a killed engine
    os.waitpid(dead, 0)
    mine = Landing(f"{lmod.landing_prefix(instance, 3)}.p{os.getpid()}.c1n1", CAP)
    left = naming.list_instance_segments(instance)
    assert any(f".p{dead}." in e for e in left)
    removed = lmod.sweep_stale(lmod.landing_prefix(instance, 3))
    assert removed and all(f".p{dead}." in e for e in removed)
    assert all(f".p{dead}." not in e for e in naming.list_instance_segments(instance))
    mine.close()
    assert naming.list_instance_segments(instance) == []


def test_a_landing_is_sized_for_the_largest_answer_within_bounds() -> None:
    from flexemr.transport.rdma.landing import LANDING_BYTES, MIN_DATA_LANDING, landing_bytes_for

    assert landing_bytes_for(0) == MIN_DATA_LANDING == 2 << 20      # an old server's 32 x 64 KiB slots fit
    for largest in (1, 900 << 10, 1 << 20, 3 << 20):
        cap = landing_bytes_for(largest)
        assert largest <= max_chunk(cap) and cap & (cap - 1) == 0  # lands whole, in one chunk
    assert landing_bytes_for(100 << 20) == LANDING_BYTES            # bounded: bigger answers are split (copied)


def test_version_3_is_what_a_server_placing_its_writes_answers_and_parses_like_version_2() -> None:
    from flexemr.transport.rdma.blob import ConnectionBlob, ReadTable, RemoteRegion

    gid = bytes(10) + b"\xff\xff" + bytes([10, 0, 2, 15])
    t = ReadTable(3, 1, 0, 10, 0x7F00_2000_0000, 0xBEEF, 16, 4)
    b = ConnectionBlob(0x11, 5, 0x11, 5, gid, 1024, 32, 65536, 2, (RemoteRegion(0x7F00_0000_1000, 2 << 20, 1),),
                       version=3, tables=(t,), boot_version=1)
    back = ConnectionBlob.unpack_padded(b.pack() + bytes(40))
    assert back.version == 3 and back.tables == (t,) and back.boot_version == 1
