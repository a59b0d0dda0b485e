"""Cache fills by RDMA READ, the parts that need no RDMA device.

The connection blob's versions (a new ranker's blob parses on an old server;
table entries only in version 2), the engine's decision (READ or FETCH
frame) and its answer: with a stand-in for the RNIC (the only fake: a stream
whose READs copy bytes from a numpy table), the completion the engine writes
into a real shared-memory ring decodes as exactly the rows a server's
FETCH_RESP would carry.  The server's registry registers once per shard and
version, not per connection, and deregisters a retired version only after
the connections told about it are gone.  The daemon over soft-RoCE is
tests/rdma/test_daemon_read.py.
"""

from __future__ import annotations

import collections
import struct
import threading
import uuid
import weakref

import numpy as np
import pytest

from flexemr.transport.rdma import BlobError, ConnectionBlob, ReadTable, RemoteRegion
from flexemr.transport.rdma.blob import HEADER, gid_bytes

GID = gid_bytes("0000:0000:0000:0000:0000:ffff:0a00:020f")
V1_HEADER = struct.Struct("!4sHHIIII16sIIII8x")   # what a version 1 peer parses


def blob(**kw: object) -> ConnectionBlob:
    fields: dict[str, object] = dict(qpn=0x11, psn=5, credit_qpn=0x11, credit_psn=5, gid=GID, mtu=1024,
                                     recv_slots=32, recv_slot_bytes=65536, flags=2,
                                     regions=(RemoteRegion(0x7F00_0000_1000, 2 << 20, 0x1234),))
    fields.update(kw)
    return ConnectionBlob(**fields)  # type: ignore[arg-type]


def entry(table_id: int = 3, version: int = 1, first_row: int = 100, rows: int = 50, dim: int = 4,
          addr: int = 0x7F00_2000_0000) -> ReadTable:
    return ReadTable(table_id, version, first_row, rows, addr, 0xBEEF, 4 * dim, dim)


# ---------------------------------------------------------------- blob versions

def test_a_new_rankers_blob_is_version_1_that_an_old_server_parses_and_says_it_reads_2() -> None:
    for accepts in (2, 3):   # 3: it also offers its landing (rdma/landing.py); a v2 server reads that as 2
        data = blob(accepts=accepts).pack()
        old = V1_HEADER.unpack_from(data)
        assert old[0] == b"FXRB" and old[1] == 1 and old[11] == 2, "an old server checks version 1 and flags only"
        assert len(data) == V1_HEADER.size + 24
        assert ConnectionBlob.unpack(data).peer_reads == accepts


def test_an_old_peers_blob_reads_as_version_1_only() -> None:
    # A v1 peer leaves bytes 56..63 zero: it reads version 1 only, so it gets no tables.
    data = bytearray(blob().pack())
    data[56:64] = bytes(8)
    assert ConnectionBlob.unpack(bytes(data)).peer_reads == 1


def test_version_2_carries_the_read_tables_and_boot_version() -> None:
    b = blob(version=2, tables=(entry(), entry(table_id=4, version=7, first_row=0, rows=9, dim=3)),
             boot_version=1)
    data = b.pack() + bytes(13)   # as it arrives inside a HELLO: NUL padding after it
    got = ConnectionBlob.unpack_padded(data)
    assert got == b and got.tables[1].dim == 3 and got.boot_version == 1
    assert got.tables[0].region() == RemoteRegion(0x7F00_2000_0000, 50 * 16, 0xBEEF)
    assert HEADER.size == 64


def test_tables_need_version_2_and_sane_rows() -> None:
    with pytest.raises(BlobError, match="need version 2"):
        blob(tables=(entry(),))
    with pytest.raises(BlobError, match="not rows of float32"):
        blob(version=2, tables=(ReadTable(1, 1, 0, 10, 0x1000, 1, 8, 4),))   # stride shorter than a row
    v2 = bytearray(blob(version=2, tables=(entry(),)).pack())
    v2[4:6] = (4).to_bytes(2, "big")   # 3 is the landing's (rdma/landing.py); 4 is not known yet
    with pytest.raises(BlobError, match="version 4 not supported"):
        ConnectionBlob.unpack(bytes(v2))


def test_a_version_1_blob_ignores_what_a_v1_sender_left_in_the_reserved_bytes() -> None:
    data = bytearray(blob().pack())
    data[58:64] = b"\x00\x05junk"   # v1 never defined these bytes: they must not become tables
    got = ConnectionBlob.unpack(bytes(data))
    assert got.tables == () and got.boot_version == 0


# ---------------------------------------------------------------- the engine's decision

def test_plan_reads_only_advertised_rows_of_the_named_version() -> None:
    from flexemrd.engine.reads import ReadPlan, plan_read

    tables = (entry(version=1), entry(version=2))
    assert isinstance(plan_read(tables, 3, 1, np.array([100, 149])), ReadPlan)
    assert "version 5" in plan_read(tables, 3, 5, np.array([100]))
    assert "not advertised" in plan_read(tables, 9, 1, np.array([100]))
    assert "id 150" in plan_read(tables, 3, 1, np.array([120, 150]))
    assert "id 99" in plan_read(tables, 3, 1, np.array([99]))
    assert plan_read(tables, 3, 1, np.array([], dtype=np.int64)) == "no ids"


def test_plan_coalesces_near_rows_into_one_read_and_keeps_the_fetch_order() -> None:
    from flexemrd.engine.reads import GAP_ROWS, plan_read

    ids = np.array([110, 104, 105, 104, 130, 106 + GAP_ROWS])
    plan = plan_read((entry(),), 3, 1, ids)
    assert not isinstance(plan, str)
    assert plan.reads == 2, "104..114 is one span (gaps within GAP_ROWS), 130 another"
    rows = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)   # the server's shard, rows 100..149
    staging = np.zeros((plan.staging_rows, 4), np.float32)
    for local, nbytes, remote in plan.groups:
        for lo, n, ro in zip(local, nbytes, remote):
            staging.view(np.uint8).reshape(-1)[lo:lo + n] = rows.view(np.uint8).reshape(-1)[ro:ro + n]
    np.testing.assert_array_equal(staging[plan.positions], rows[ids - 100])


def test_plan_splits_reads_across_two_shards_of_one_table() -> None:
    from flexemrd.engine.reads import plan_read

    plan = plan_read((entry(first_row=0, rows=10, addr=0x1000), entry(first_row=20, rows=10, addr=0x9000)),
                     3, 1, np.array([21, 2, 3]))
    assert not isinstance(plan, str)
    assert [e.first_row for e in plan.entries] == [0, 20] and plan.reads == 2


# ---------------------------------------------------------------- the engine's answer (a stand-in RNIC)

class FakeRegion:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeEndpoint:
    def register(self, buf: np.ndarray) -> FakeRegion:
        return FakeRegion(buf)


class FakeStream:
    """Stands in for the RNIC: READs copy bytes from the server's table; at most ``per_post`` per call."""

    def __init__(self, memory: dict[int, np.ndarray], per_post: int = 2) -> None:
        self.ep = FakeEndpoint()
        self.memory = memory
        self.per_post = per_post
        self.done: collections.Counter[int] = collections.Counter()
        self.posts = 0
        self.fail = False

    def post_reads(self, local: FakeRegion, offsets, nbytes, remote: RemoteRegion, remote_offsets, tag: int) -> int:
        n = min(self.per_post, len(offsets))
        src = self.memory[remote.addr]
        for lo, k, ro in zip(offsets[:n], nbytes[:n], remote_offsets[:n]):
            remote.check(int(ro), int(k), "READ")
            local.array[lo:lo + k] = src[ro:ro + k]
        self.done[tag] += n
        self.posts += 1
        return n

    def take_reads(self) -> dict[int, int]:
        if self.fail:
            raise ConnectionError("remote access error on data QP")
        done, self.done = dict(self.done), collections.Counter()
        return done


class FakeRdmaConnection:
    transport_name = "rdma"

    def __init__(self, conn_id: int, stream: FakeStream, tables: tuple[ReadTable, ...], boot_version: int) -> None:
        self.conn_id = conn_id
        self.server = 0
        self.stream = stream
        self.read_tables = tables
        self.boot_version = boot_version


@pytest.fixture()
def ring():
    from flexemr import naming
    from flexemr.ring import Ring

    r = Ring.create(naming.shm_name("t" + uuid.uuid4().hex[:8], "ring", "comp"), 4 << 20)
    yield r
    r.close()
    r.unlink()


def _engine(ring, tables_rows: dict[int, np.ndarray], version: int = 1, per_post: int = 2):
    from flexemrd.engine.completions import CompletionWriter
    from flexemrd.engine.connections import ConnState, ConnTable
    from flexemrd.engine.reads import CacheReads

    memory, entries = {}, []
    for i, (tid, rows) in enumerate(tables_rows.items()):
        addr = 0x10_0000 * (i + 1)
        memory[addr] = rows.view(np.uint8).reshape(-1)
        entries.append(ReadTable(tid, version, 0, rows.shape[0], addr, 7, rows.shape[1] * 4, rows.shape[1]))
    stream = FakeStream(memory, per_post)
    conn = FakeRdmaConnection(5, stream, tuple(entries), boot_version=version)
    table = ConnTable()
    st = ConnState(conn)  # type: ignore[arg-type]
    table.add(st)
    writer = CompletionWriter(ring, lambda: None)
    writer.bind_producer()
    return CacheReads(table, writer, 0), st, stream


def _fetch_frame(rid: int, table_id: int, ids: np.ndarray, version: int = 0) -> memoryview:
    from flexemr.wire import codec

    return memoryview(b"".join(bytes(memoryview(p).cast("B")) for p in codec.encode_fetch(rid, table_id, ids, version)))


def test_a_read_fill_lands_as_the_fetch_resp_the_server_would_have_sent(ring) -> None:
    from flexemr import enginemsg as em
    from flexemr.wire import codec
    from flexemr.wire.frame import HEADER_SIZE, FrameType, unpack_header

    rows = np.random.default_rng(1).standard_normal((37, 5)).astype(np.float32)
    reads, st, stream = _engine(ring, {2: rows})
    ids = np.array([36, 0, 1, 2, 20, 9, 0])
    assert reads.try_read(5, _fetch_frame(41, 2, ids))   # version 0: the server's boot version (1)
    assert st.inflight == 1, "a READ fill counts as in flight: drain and retirement wait for it"
    msg = None
    for _ in range(10):    # each completion wakes the receiver, which posts what waits, until all are in
        reads.land(st)
        msg = ring.read(timeout=0.01)
        if msg is not None:
            break
    assert msg is not None and msg.kind == em.COMP_FRAME
    cid, _ = em.PREFIX.unpack_from(msg.data, 0)
    h = unpack_header(msg.data[em.PREFIX_SIZE:em.PREFIX_SIZE + HEADER_SIZE])
    assert (cid, h.type, h.request_id, h.aux) == (5, FrameType.FETCH_RESP, 41, 1)
    tid, got = codec.decode_fetch_response(msg.data[em.PREFIX_SIZE + HEADER_SIZE:])
    assert tid == 2
    np.testing.assert_array_equal(got, rows[ids])
    msg.release()
    assert st.inflight == 0 and stream.posts >= 2, "posted in rounds as the stream took them"
    assert reads.snapshot()["rows_read"] == len(ids) and reads.fetch_frames == 0


def test_fetches_the_server_did_not_advertise_go_as_frames(ring) -> None:
    rows = np.zeros((10, 4), np.float32)
    reads, st, _ = _engine(ring, {2: rows})
    assert not reads.try_read(5, _fetch_frame(1, 2, np.array([3]), version=2)), "another model version"
    assert not reads.try_read(5, _fetch_frame(2, 2, np.array([10])))           # outside the advertised rows
    assert not reads.try_read(5, _fetch_frame(3, 7, np.array([1])))            # a table not advertised
    from flexemr.wire import codec

    lookup = memoryview(b"".join(bytes(memoryview(p).cast("B")) for p in codec.encode_credit(5, 1, 0)))
    assert not reads.try_read(5, lookup), "only FETCH frames are looked at"
    assert reads.fetch_frames == 3 and st.inflight == 0


def test_a_plan_whose_reads_would_leave_the_slot_goes_as_a_frame_and_posts_nothing(ring, monkeypatch) -> None:
    # What QEMU's emulated AVX2 argsort did to np.unique in the guest: unique ids in a wrong order,
    # so spans of negative length.  The engine posted a READ of -5824 bytes and exited; now the whole
    # plan is checked before anything is posted and the fill goes as a FETCH frame.
    from flexemrd.engine import reads as reads_mod

    real_unique = np.unique

    def misordered(a, return_inverse=False):
        u, inverse = real_unique(a, return_inverse=True)
        perm = np.arange(len(u))[::-1]
        back = np.empty_like(perm)
        back[perm] = np.arange(len(u))
        return (u[perm], back[inverse]) if return_inverse else u[perm]

    rows = np.zeros((40, 4), np.float32)
    reads, st, stream = _engine(ring, {2: rows})
    monkeypatch.setattr(reads_mod.np, "unique", misordered)
    assert not reads.try_read(5, _fetch_frame(1, 2, np.array([1, 30, 15])))
    monkeypatch.setattr(reads_mod.np, "unique", real_unique)
    assert stream.posts == 0 and st.inflight == 0 and reads.fetch_frames == 1
    assert reads.try_read(5, _fetch_frame(2, 2, np.array([1, 30, 15]))), "the staging slot was given back"


def test_a_failed_read_loses_the_connection_and_writes_nothing(ring) -> None:
    rows = np.zeros((10, 4), np.float32)
    reads, st, stream = _engine(ring, {2: rows})
    assert reads.try_read(5, _fetch_frame(1, 2, np.array([3])))
    stream.fail = True
    with pytest.raises(ConnectionError):
        reads.land(st)
    assert ring.read(timeout=0.1) is None, "no answer: the inference fails the fill when the connection is lost"
    assert not reads._fills


# ---------------------------------------------------------------- the server's registry

class RecordingEndpoint:
    """Stands in for the RNIC's registration: refuses ``refuse`` buffers first (like EFAULT on a shared map)."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.registered: list[FakeRegion] = []

    def register(self, buf, *, remote_read: bool = False) -> FakeRegion:
        from flexemr.transport.rdma.endpoint import RegistrationError

        if self.refuse:
            self.refuse -= 1
            raise RegistrationError("fake0: cannot register (Bad address)")
        r = FakeRegion(np.asarray(buf))
        r.addr, r.rkey, r.length = 0x1000 * (len(self.registered) + 1), 9, r.array.nbytes  # type: ignore[attr-defined]
        self.registered.append(r)
        return r

    def register_for_reads(self, buf, what, **kw):
        from flexemr.transport.rdma.endpoint import Endpoint

        return Endpoint.register_for_reads(self, buf, what, **kw)  # type: ignore[arg-type]


class Conn:
    def __init__(self, advertised) -> None:
        self.advertised = advertised
        self.stream = object()


@pytest.fixture()
def store(tmp_path):
    from flexemr.model.presets import init_model_dir
    from flexemr.model.spec import load_spec
    from flexemr.routing.table import RoutingTable
    from flexemrd.embedding.store import EmbeddingStore

    model = tmp_path / "model"
    init_model_dir(model, "tiny", seed=11)
    spec = load_spec(model)
    routing = RoutingTable.build(spec, 2)
    return EmbeddingStore(str(model), spec, routing.shards_of(0), kernel="numpy")


def test_registry_registers_each_shard_once_and_keeps_retired_ones_while_told(store, caplog) -> None:
    import logging

    from flexemrd.embedding.reads import ReadRegistry

    ep = RecordingEndpoint(refuse=1)
    reg = ReadRegistry(store, lambda: ep)
    with caplog.at_level(logging.INFO):
        first, boot = reg.advertise()
        again, _ = reg.advertise()
    assert boot == store.boot_version and first == again and first
    assert len(ep.registered) == len(first), "once per shard and version, not per connection"
    # The boot tables are shared read-only maps: the refused one was registered again from a private map.
    assert "cache fills of" in caplog.text and ": RDMA READ (rows [" in caplog.text
    t = first[0]
    held = store.versions[t.model_version].tables[t.table_id].pooler.table
    np.testing.assert_array_equal(ep.registered[0].array.view(np.float32).reshape(-1, t.dim),
                                  held[t.first_row:t.first_row + t.rows])
    conn = Conn(first)
    reg.bind(conn)
    store.versions = {}                       # the version is retired ...
    assert reg.sweep() == 0, "... but a connection was told about it: its memory stays registered"
    conn.stream = None                        # that connection closed
    assert reg.sweep() == len(first)
    assert all(r.closed for r in ep.registered)
