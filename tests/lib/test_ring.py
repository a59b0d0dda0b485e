"""flexemr.ring: SPSC shared-memory message rings and doorbells.

Each test gets its own instance name; the ``rings`` fixture closes and
unlinks what the test created through the public API and then asserts that
nothing of the instance is left in /dev/shm.
"""

from __future__ import annotations

import ast
import collections
import multiprocessing as mp
import os
import pathlib
import signal
import socket
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import posix_ipc
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexemr.ring.ring as ring_mod
from flexemr import naming
from flexemr.ring import Doorbell, Message, Ring, RingError, max_message_for, slot_bytes, wait_any
from flexemr.ring.layout import HEADER_BYTES, MAGIC, MSG_HEADER_BYTES, SLOT_ALIGN

FORK = mp.get_context("fork")


class Rings:
    """Creates rings/doorbells for one test and cleans them up via the public API."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.created: list[Ring | Doorbell] = []
        self._n = 0

    def name(self) -> str:
        self._n += 1
        return naming.ring_names(self.instance, self._n)[0]

    def ring(self, capacity: int = 4096, doorbell: Doorbell | None = None) -> Ring:
        r = Ring.create(self.name(), capacity, doorbell=doorbell)
        self.created.append(r)
        return r

    def doorbell(self, what: str = "cmp") -> Doorbell:
        db = Doorbell.create(naming.doorbell_name(self.instance, what))
        self.created.append(db)
        return db

    def cleanup(self) -> None:
        for obj in reversed(self.created):
            obj.close()
            obj.unlink()


@pytest.fixture
def rings() -> Iterator[Rings]:
    inst = "t" + uuid.uuid4().hex[:16]
    r = Rings(inst)
    try:
        yield r
    finally:
        r.cleanup()
        leftovers = naming.list_instance_segments(inst)
        naming.unlink_instance_segments(inst)
    assert leftovers == [], f"segments left behind: {leftovers}"


def payload(i: int, n: int) -> bytes:
    """Deterministic bytes for message i of n bytes."""
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n] if n else b""


def run_child(target: Callable[..., None], *args: object) -> mp.process.BaseProcess:
    p = FORK.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def join_ok(p: mp.process.BaseProcess, timeout: float = 10.0) -> None:
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("child process hung")
    assert p.exitcode == 0, f"child exit code {p.exitcode}"


# ---------------------------------------------------------------- single process


def test_write_peek_release_and_stats(rings: Rings) -> None:
    r = rings.ring(4096)
    assert r.max_message == 4096 // 2 - MSG_HEADER_BYTES == max_message_for(4096)
    assert r.peek() is None and r.depth() == 0 and r.used_bytes() == 0
    ids = np.arange(5, dtype=np.int64)
    assert r.write(b"abc", ids, kind=7)
    assert r.depth() == 1 and r.used_bytes() == slot_bytes(3 + 40)
    msg = r.peek()
    assert msg is not None and msg.kind == 7 and msg.nbytes == 43
    assert bytes(msg.data[:3]) == b"abc"
    assert np.frombuffer(msg.data, dtype=np.int64, offset=3).tolist() == [0, 1, 2, 3, 4]
    assert r.peek() is None  # handed out once
    msg.release()
    st_ = r.stats()
    assert (st_.msgs_written, st_.msgs_read, st_.bytes_written, st_.bytes_read) == (1, 1, 43, 43)
    assert st_.depth == 0 and st_.used_bytes == 0 and r.depth() == 0
    with pytest.raises(ValueError):
        msg.data.tobytes()  # the view dies with the release


def test_slots_are_aligned_for_numpy(rings: Rings) -> None:
    r = rings.ring(8192)
    base = np.frombuffer(r._data, dtype=np.uint8).ctypes.data
    for n in (0, 1, 7, 8, 63, 64, 65, 1000):
        view = r.try_reserve(n)
        assert view is not None
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data if n else base + r._res_start + MSG_HEADER_BYTES
        assert (addr - MSG_HEADER_BYTES - base) % SLOT_ALIGN == 0
        assert addr % 8 == 0
        r.commit()
        m = r.peek()
        assert m is not None
        if n >= 8:
            assert np.frombuffer(m.data, dtype=np.int64, count=n // 8).ctypes.data % 8 == 0
        m.release()


def test_many_wraps_byte_exact(rings: Rings) -> None:
    r = rings.ring(1024)
    held: collections.deque[tuple[int, bytes]] = collections.deque()
    sizes = [0, 1, 13, 56, 57, 100, 255, 300, r.max_message, 64 - MSG_HEADER_BYTES, 7, 499]
    for i in range(600):
        data = payload(i, sizes[i % len(sizes)])
        while not r.write(data, kind=i % 1000, timeout=0):
            m = r.peek()
            assert m is not None
            k, expect = held.popleft()
            assert (m.kind, bytes(m.data)) == (k, expect)
            m.release()
        held.append((i % 1000, data))
    while held:
        m = r.peek()
        assert m is not None
        assert (m.kind, bytes(m.data)) == held.popleft()
        m.release()
    assert r.peek() is None
    assert r.stats().head // r.capacity >= 50  # really went round many times


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.sampled_from([256, 1024, 4096]),
    ops=st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 4)), min_size=1, max_size=150),
)
def test_random_sizes_consumer_sees_exact_sequence(capacity: int, ops: list[tuple[int, int]]) -> None:
    """Random sizes and random consumer lag: exactly the produced sequence, byte for byte."""
    inst = "h" + uuid.uuid4().hex[:16]
    r = Ring.create(naming.ring_names(inst, 0)[0], capacity)
    try:
        got: list[bytes] = []
        sent: list[bytes] = []
        held: collections.deque[Message] = collections.deque()
        for i, (size, lag) in enumerate(ops):
            data = payload(i, size % (r.max_message + 1))
            while not r.write(data, kind=i, timeout=0):
                m = held.popleft() if held else r.peek()
                assert m is not None, "ring full but nothing to read"
                got.append(bytes(m.data))
                m.release()
            sent.append(data)
            # hold up to `lag` messages without releasing, in order
            while len(held) < lag:
                m = r.peek()
                if m is None:
                    break
                held.append(m)
        while held:
            m = held.popleft()
            got.append(bytes(m.data))
            m.release()
        while (m := r.peek()) is not None:
            got.append(bytes(m.data))
            m.release()
        assert got == sent
        assert r.depth() == 0 and r.used_bytes() == 0
    finally:
        r.close()
        r.unlink()
    assert naming.list_instance_segments(inst) == []


def test_full_ring_returns_none_not_exception(rings: Rings) -> None:
    r = rings.ring(1024)
    n = 0
    while r.try_reserve(100) is not None:
        r.commit(kind=n)
        n += 1
    assert n == 1024 // slot_bytes(100)
    assert r.try_reserve(100) is None
    assert r.write(b"x" * 100, timeout=0) is False
    t0 = time.monotonic()
    assert r.reserve(100, timeout=0.05) is None
    assert 0.04 <= time.monotonic() - t0 < 1.0
    with r.acquire_write(100, timeout=0) as slot:
        assert slot is None
    m = r.peek()
    assert m is not None
    m.release()
    assert r.reserve(100, timeout=0) is not None
    r.commit()


def test_message_too_large_raises_naming_sizes(rings: Rings) -> None:
    r = rings.ring(4096)
    with pytest.raises(ValueError, match=r"4089 bytes.*0\.\.2040.*capacity 4096"):
        r.try_reserve(4089)
    with pytest.raises(ValueError, match="2041 bytes"):
        r.write(b"x" * 2041)
    with pytest.raises(ValueError):
        r.try_reserve(-1)
    # the largest message fits even when the write position forces a wrap
    assert r.write(b"y" * 100)
    m = r.read(0)
    assert m is not None
    m.release()
    for _ in range(5):
        assert r.write(b"z" * r.max_message, timeout=0)
        m = r.read(0)
        assert m is not None and m.nbytes == r.max_message
        m.release()


def test_release_out_of_order_is_refused(rings: Rings) -> None:
    r = rings.ring()
    for i in range(3):
        assert r.write(payload(i, 10), kind=i)
    a, b = r.peek(), r.peek()
    assert a is not None and b is not None and (a.kind, b.kind) == (0, 1)
    with pytest.raises(RuntimeError, match="in the order"):
        b.release()
    assert r.depth() == 3
    a.release()
    with pytest.raises(RuntimeError, match="twice"):
        a.release()
    b.release()
    other = rings.ring()
    other.write(b"q")
    foreign = other.peek()
    assert foreign is not None
    with pytest.raises(RuntimeError, match="belongs"):
        r._release(foreign)
    foreign.release()
    with r.acquire_read(0) as c:
        assert c is not None and c.kind == 2
    assert r.depth() == 0


def test_commit_shrinks_and_recv_into_slot(rings: Rings) -> None:
    r = rings.ring(8192)
    a, b = socket.socketpair()
    try:
        a.sendall(b"batch-bytes" * 10)
        slot = r.reserve(1000, timeout=1)
        assert slot is not None
        got = b.recv_into(slot, 1000)  # zero-copy: the kernel writes into the ring
        r.commit(got, kind=3)
    finally:
        a.close()
        b.close()
    assert r.used_bytes() == slot_bytes(110)
    m = r.read(0)
    assert m is not None and m.kind == 3 and bytes(m.data) == b"batch-bytes" * 10
    m.release()
    slot = r.try_reserve(10)
    with pytest.raises(ValueError, match="11 bytes"):
        r.commit(11)
    with pytest.raises(RuntimeError, match="pending"):
        r.try_reserve(10)
    r.cancel()
    with pytest.raises(RuntimeError, match="without a reservation"):
        r.commit()
    with pytest.raises(ValueError, match="kind"):
        r.write(b"", kind=0xFFFF_FFFF)
    r.cancel()


def test_cancel_and_context_managers(rings: Rings) -> None:
    r = rings.ring()
    slot = r.try_reserve(50)
    assert slot is not None
    slot[:] = b"g" * 50
    r.cancel()
    assert r.peek() is None and r.used_bytes() == 0
    with pytest.raises(KeyError):
        with r.acquire_write(20) as slot:
            assert slot is not None
            raise KeyError("boom")
    assert r.peek() is None
    with r.acquire_write(5, kind=9) as slot:
        assert slot is not None
        slot[:] = b"hello"
    with r.acquire_write(100, kind=10) as slot:
        assert slot is not None
        slot[:2] = b"hi"
        r.commit(2, kind=10)
    with r.acquire_read(0) as m:
        assert m is not None and (m.kind, bytes(m.data)) == (9, b"hello")
    with r.acquire_read(0) as m:
        assert m is not None and (m.kind, bytes(m.data)) == (10, b"hi")
    with r.acquire_read(0.01) as m:
        assert m is None


def test_close_with_live_numpy_view_does_not_raise(rings: Rings) -> None:
    r = rings.ring()
    r.write(np.arange(4, dtype=np.float32))
    m = r.read(0)
    assert m is not None
    arr = np.frombuffer(m.data, dtype=np.float32)
    m.release()  # arr still exports the view: release is best effort
    r.close()
    r.close()  # idempotent
    assert arr.tolist() == [0.0, 1.0, 2.0, 3.0]  # mapping lives as long as arr
    del arr


def test_doorbell_ring_wait_drain(rings: Rings) -> None:
    db = rings.doorbell("x")
    assert db.wait(0) is False
    t0 = time.monotonic()
    assert db.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.04
    db.ring()
    db.ring()
    db.ring()
    assert db.pending == 3
    assert db.wait(1) is True
    assert db.drain() == 2
    assert db.pending == 0
    with pytest.raises(FileExistsError):
        Doorbell.create(db.name)
    with pytest.raises(FileNotFoundError):
        Doorbell.attach(naming.doorbell_name(rings.instance, "missing"))


def test_attach_finds_doorbells_by_name(rings: Rings) -> None:
    own = rings.ring()
    shared = rings.doorbell("cmp")
    via_shared = rings.ring(doorbell=shared)
    a = Ring.attach(own.name)
    b = Ring.attach(via_shared.name)
    try:
        assert a.data_doorbell.name == naming.ring_doorbell_names(own.name)[0]
        assert a.space_doorbell.name == naming.ring_doorbell_names(own.name)[1]
        assert b.data_doorbell.name == shared.name
        assert (a.capacity, a.max_message) == (own.capacity, own.max_message)
        assert a.write(b"via attach")
        m = own.read(1)
        assert m is not None and bytes(m.data) == b"via attach"
        m.release()
        assert a.stats() == own.stats()
    finally:
        a.close()
        b.close()
    # unlinking a ring leaves a shared doorbell to its creator
    via_shared.close()
    via_shared.unlink()
    rings.created.remove(via_shared)
    Doorbell.attach(shared.name).close()


def test_attach_refuses_wrong_magic_version_or_missing(rings: Rings) -> None:
    with pytest.raises(FileNotFoundError):
        Ring.attach(naming.ring_names(rings.instance, 99)[0])
    junk = naming.shm_name(rings.instance, "junk")
    shm = posix_ipc.SharedMemory(junk, posix_ipc.O_CREX, size=8192)
    shm.close_fd()
    try:
        with pytest.raises(RingError, match="bad magic"):
            Ring.attach(junk)
    finally:
        posix_ipc.unlink_shared_memory(junk)
    r = rings.ring()
    assert bytes(r._buf[:8]) == MAGIC
    r._buf[8:12] = struct.pack("<I", 99)
    with pytest.raises(RingError, match="version 99"):
        Ring.attach(r.name)
    with pytest.raises(FileExistsError):
        Ring.create(r.name, 4096)
    with pytest.raises(ValueError, match="multiple of 64"):
        Ring.create(rings.name(), 1000)


def test_failed_create_leaves_nothing_behind(rings: Rings) -> None:
    name = rings.name()
    squatter = Doorbell.create(naming.ring_doorbell_names(name)[1])
    rings.created.append(squatter)
    with pytest.raises(FileExistsError):
        Ring.create(name, 4096)
    assert naming.list_instance_segments(rings.instance) == [f"sem.{squatter.name[1:]}"]


def test_ring_modules_stay_off_the_control_path() -> None:
    ring_dir = pathlib.Path(ring_mod.__file__).parent
    for path in ring_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                top = n.split(".")[0]
                assert top not in {"logging", "json", "click", "pickle"}, f"{path.name} imports {n}"
                assert not n.startswith("flexemr.control"), f"{path.name} imports {n}"


# ---------------------------------------------------------------- across processes


def _checksum_producer(name: str, count: int, seed: int) -> None:
    r = Ring.attach(name)
    rng = np.random.default_rng(seed)
    for i in range(count):
        body = rng.integers(0, 256, size=int(rng.integers(0, 6000)), dtype=np.uint8)
        crc = struct.pack("<I", zlib.crc32(body))
        if not r.write(crc, body, kind=i, timeout=10):
            os._exit(3)
    r.close()


def test_cross_process_2000_messages_with_checksums(rings: Rings) -> None:
    r = rings.ring(64 * 1024)  # small: the producer wraps and blocks on space
    p = run_child(_checksum_producer, r.name, 2000, 1234)
    total = 0
    for i in range(2000):
        m = r.read(timeout=10)
        assert m is not None, f"message {i} never arrived"
        assert m.kind == i
        crc, = struct.unpack_from("<I", m.data)
        assert zlib.crc32(m.data[4:]) == crc
        total += m.nbytes
        m.release()
    join_ok(p)
    st_ = r.stats()
    assert st_.msgs_written == st_.msgs_read == 2000
    assert st_.bytes_read == total and st_.head > 20 * r.capacity


def _idle_consumer(name: str, conn: object) -> None:
    r = Ring.attach(name)
    conn.send("waiting")  # type: ignore[attr-defined]
    m = r.read(timeout=10)
    t = time.monotonic()
    conn.send((None if m is None else bytes(m.data), t))  # type: ignore[attr-defined]
    if m is not None:
        m.release()
    r.close()


def test_idle_consumer_sleeps_then_wakes(rings: Rings) -> None:
    r = rings.ring()
    parent, child = FORK.Pipe()
    p = run_child(_idle_consumer, r.name, child)
    assert parent.poll(5) and parent.recv() == "waiting"
    proc = psutil.Process(p.pid)
    time.sleep(0.05)
    c0 = proc.cpu_times()
    time.sleep(1.0)
    c1 = proc.cpu_times()
    idle_cpu = (c1.user + c1.system) - (c0.user + c0.system)
    assert idle_cpu < 0.05, f"idle consumer burned {idle_cpu:.3f}s CPU in 1s"
    t0 = time.monotonic()
    assert r.write(b"wake up")
    assert parent.poll(5)
    data, t_woke = parent.recv()
    assert data == b"wake up"
    assert t_woke - t0 < 0.5
    join_ok(p)


def _slow_releaser(name: str, delay: float) -> None:
    r = Ring.attach(name)
    time.sleep(delay)
    m = r.read(5)
    assert m is not None
    m.release()
    r.close()


def test_blocked_producer_is_woken_by_release(rings: Rings, monkeypatch: pytest.MonkeyPatch) -> None:
    # a long re-check slice proves the wake comes from the space doorbell
    monkeypatch.setattr(ring_mod, "_SPACE_SLICE_S", 30.0)
    r = rings.ring(1024)
    while r.write(b"f" * 200, timeout=0):
        pass
    p = run_child(_slow_releaser, r.name, 0.3)
    t0 = time.monotonic()
    c0 = time.process_time()
    slot = r.reserve(200, timeout=10)
    elapsed = time.monotonic() - t0
    assert slot is not None and 0.2 < elapsed < 2.0
    assert time.process_time() - c0 < 0.05  # slept, did not spin
    r.commit()
    join_ok(p)
    # exactly one ring for one sleep: no stale post left for the next wait
    assert r.space_doorbell.pending == 0
    assert r._ctr[ring_mod.SPACE_WAIT_SEQ] == r._ctr[ring_mod.SPACE_WOKEN_SEQ]


def _shared_db_producer(name: str, count: int, tag: int) -> None:
    r = Ring.attach(name)
    for i in range(count):
        assert r.write(struct.pack("<II", tag, i), kind=tag, timeout=5)
        time.sleep(0.001)
    r.close()


def test_shared_doorbell_across_two_rings(rings: Rings) -> None:
    db = rings.doorbell("cmp")
    r1, r2 = rings.ring(doorbell=db), rings.ring(doorbell=db)
    assert r1.data_doorbell.name == r2.data_doorbell.name == db.name
    ps = [run_child(_shared_db_producer, r.name, 100, tag) for tag, r in enumerate((r1, r2))]
    seen = {0: [], 1: []}
    deadline = time.monotonic() + 10
    while len(seen[0]) + len(seen[1]) < 200 and time.monotonic() < deadline:
        for r in wait_any([r1, r2], timeout=1):
            while (m := r.peek()) is not None:
                tag, i = struct.unpack("<II", m.data)
                assert tag == m.kind
                seen[tag].append(i)
                m.release()
    assert seen == {0: list(range(100)), 1: list(range(100))}
    for p in ps:
        join_ok(p)
    assert wait_any([r1, r2], timeout=0.01) == []
    with pytest.raises(ValueError, match="shared"):
        wait_any([r1, rings.ring()], timeout=0)


def _dies_mid_read(name: str) -> None:
    r = Ring.attach(name)
    for _ in range(2):
        m = r.read(1)
        assert m is not None
        m.release()
    m = r.read(1)
    assert m is not None
    _ = bytes(m.data[: m.nbytes // 2])  # half way through the payload
    os.kill(os.getpid(), signal.SIGKILL)


def test_torn_reader_killed_mid_read_does_not_corrupt_producer(rings: Rings) -> None:
    r = rings.ring(4096)
    sent = [payload(i, 300 + 37 * i) for i in range(5)]
    for i, data in enumerate(sent):
        assert r.write(data, kind=i)
    p = run_child(_dies_mid_read, r.name)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    # the dead consumer released two messages; the one it held is still queued
    assert r.depth() == 3
    # the producer carries on until full: a status, never an exception or a hang
    t0 = time.monotonic()
    i = 5
    while r.write(payload(i, 300), kind=i, timeout=0.05):
        sent.append(payload(i, 300))
        i += 1
    assert time.monotonic() - t0 < 2
    # a restarted consumer resumes at the held message, byte for byte
    fresh = Ring.attach(r.name)
    try:
        for k in range(2, len(sent)):
            m = fresh.read(0)
            assert m is not None and m.kind == k and bytes(m.data) == sent[k]
            m.release()
        assert fresh.read(0) is None
    finally:
        fresh.close()
    assert r.write(b"after", timeout=0)


def _dies_mid_write(name: str) -> None:
    r = Ring.attach(name)
    slot = r.reserve(1000, timeout=1)
    assert slot is not None
    slot[:500] = b"t" * 500
    os.kill(os.getpid(), signal.SIGKILL)


def test_torn_writer_killed_mid_write_publishes_nothing(rings: Rings) -> None:
    r = rings.ring(4096)
    p = run_child(_dies_mid_write, r.name)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    assert r.peek() is None and r.depth() == 0
    fresh = Ring.attach(r.name)  # the restarted producer
    try:
        assert fresh.write(b"whole message", kind=4)
    finally:
        fresh.close()
    m = r.read(1)
    assert m is not None and (m.kind, bytes(m.data)) == (4, b"whole message")
    m.release()
