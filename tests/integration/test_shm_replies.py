"""Shared-memory replies against a real daemon: exact answers, held arrays stay valid, fallbacks, hostile peers.

One monolithic ``flexemrd local`` (the ranker pools: the fastest real daemon to
start) serves every test of the module; each test compares the answers that
came through the reply region with those of a client that asked for frames.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading

import numpy as np
import pytest

from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.wire import codec, replyslot
from flexemr.wire.frame import ErrorCode, FrameType, pack_header, unpack_header
from flexemr.wire.stream import send_buffers

from tests.conftest import LocalCluster
from tests.helpers.sockets import recv_exact


@pytest.fixture(scope="module")
def mono(tiny_model, tmp_path_factory):
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("shmreplies"), servers=0, engines=1)
    yield c
    c.stop()


def requests(model, n: int, batch: int = 16, seed: int = 5) -> list[tuple[np.ndarray, dict]]:
    spec = load_spec(model)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sparse = {}
        for t in spec.tables:
            lengths = rng.integers(0, 5, size=batch).astype(np.int32)
            sparse[t.name] = (rng.integers(0, t.rows, size=int(lengths.sum())).astype(np.int64), lengths)
        out.append((rng.standard_normal((batch, spec.dense_features)).astype(np.float32), sparse))
    return out


def in_region(arr: np.ndarray, client: InferenceClient) -> bool:
    """Whether ``arr`` points into ``client``'s reply region (not into a frame's buffer)."""
    region = client._region
    start = region._bytes.ctypes.data
    return start <= arr.ctypes.data < start + region.region_bytes


def test_lookup_and_predict_through_the_region_equal_the_socket_path(mono, tiny_model):
    reqs = requests(tiny_model, 4)
    with InferenceClient(mono.socket) as shm, InferenceClient(mono.socket, shm_replies=False) as plain:
        assert shm.shm_active and shm.shm_replies_error is None and not plain.shm_active
        for dense, sparse in reqs:
            a, b = shm.lookup(sparse), plain.lookup(sparse)
            assert a.keys() == b.keys()
            for name in a:
                assert in_region(a[name], shm)
                np.testing.assert_array_equal(a[name], b[name])
            s, t = shm.predict(dense, sparse), plain.predict(dense, sparse)
            assert in_region(s, shm)
            np.testing.assert_array_equal(s, t)
            assert shm.last_version == plain.last_version


def test_held_answers_stay_valid_after_later_calls_and_their_slots_come_back(mono, tiny_model):
    reqs = requests(tiny_model, 6, seed=8)
    with InferenceClient(mono.socket, reply_slots=3, reply_region_bytes=3 * 65536) as c:
        first = c.lookup(reqs[0][1])
        first_scores = c.predict(*reqs[1])
        kept = {k: v.copy() for k, v in first.items()}
        kept_scores = first_scores.copy()
        for _ in range(5):
            for dense, sparse in reqs[2:]:
                c.lookup(sparse)
                c.predict(dense, sparse)
        assert c._region.leased_slots == 2
        for name in kept:
            np.testing.assert_array_equal(first[name], kept[name])
        np.testing.assert_array_equal(first_scores, kept_scores)
        one = first[next(iter(first))]
        del first, first_scores
        assert c._region.leased_slots == 1      # one table's array keeps its whole answer's slot
        del one
        assert c._region.leased_slots == 0 and c._region.free_slots == 3


def test_with_every_slot_held_answers_come_by_frame_and_stay_exact(mono, tiny_model):
    reqs = requests(tiny_model, 4, seed=9)
    with InferenceClient(mono.socket, reply_slots=2, reply_region_bytes=2 * 65536) as c, \
            InferenceClient(mono.socket, shm_replies=False) as plain:
        held = [c.predict(*reqs[0]), c.lookup(reqs[1][1])]
        assert c._region.free_slots == 0
        s = c.predict(*reqs[2])                 # no slot to name: a normal frame, not a wait
        assert not in_region(s, c)
        np.testing.assert_array_equal(s, plain.predict(*reqs[2]))
        np.testing.assert_array_equal(held[0], plain.predict(*reqs[0]))
        held.clear()
        assert in_region(c.predict(*reqs[3]), c)


def test_an_answer_larger_than_its_slot_comes_by_frame(mono, tiny_model):
    (dense, sparse), = requests(tiny_model, 1, batch=600, seed=4)
    with InferenceClient(mono.socket, reply_slots=1, reply_region_bytes=4096) as c, \
            InferenceClient(mono.socket, shm_replies=False) as plain:
        big = c.lookup(sparse)                  # 600 x dims x 4 bytes: far over 4 KiB
        name = next(iter(big))
        assert not in_region(big[name], c) and c._region.free_slots == 1
        want = plain.lookup(sparse)
        for k in want:
            np.testing.assert_array_equal(big[k], want[k])
        assert in_region(c.predict(dense[:8], {k: (v[: int(ln[:8].sum())], ln[:8]) for k, (v, ln) in sparse.items()}),
                         c)


def test_concurrent_clients_each_get_their_own_answers(mono, tiny_model):
    """Four clients at once (their requests batched together): no answer lands in another client's region.
    Lookups are exact whatever the batch; scores of a coalesced batch may differ from a lone one by an ulp."""
    reqs = requests(tiny_model, 8, seed=12)
    with InferenceClient(mono.socket, shm_replies=False) as plain:
        want = [(plain.lookup(s), plain.predict(d, s)) for d, s in reqs]
    errors: list[str] = []

    def worker(i: int) -> None:
        with InferenceClient(mono.socket) as c:
            for _ in range(10):
                for k in range(i, len(reqs), 4):
                    pooled, scores = c.lookup(reqs[k][1]), c.predict(*reqs[k])
                    if any(not np.array_equal(pooled[n], want[k][0][n]) for n in pooled):
                        errors.append(f"client {i}: lookup {k} differs")
                    if not np.allclose(scores, want[k][1], rtol=1e-5, atol=1e-6):
                        errors.append(f"client {i}: predict {k} differs by {np.abs(scores - want[k][1]).max()}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors


# ---------------------------------------------------------------- hostile and buggy peers


class RawPeer:
    """A hand-written client: says exactly what a test wants on the ranker's socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)

    def answer(self):
        h = unpack_header(recv_exact(self.sock, 32))
        return h, recv_exact(self.sock, h.payload_len) if h.payload_len else b""

    def offer(self) -> None:
        send_buffers(self.sock, [pack_header(FrameType.PING, 1, 0, flags=replyslot.REPLY_SLOT)])
        h, _ = self.answer()
        assert h.type == FrameType.PONG and h.flags & replyslot.REPLY_SLOT

    def region(self, declared: int, fd: int | None, rid: int = 2):
        frame = replyslot.encode_region(rid, declared)
        if fd is None:
            send_buffers(self.sock, frame)
        else:
            replyslot.send_with_fd(self.sock, frame, fd)
        return self.answer()

    def close(self) -> None:
        self.sock.close()


def sealed_memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def inference_fds(c: LocalCluster) -> int:
    (inf,) = c.processes("flexemr-inf")
    return inf.num_fds()


def test_hostile_regions_get_errors_naming_the_problem_and_the_ranker_keeps_serving(mono, tiny_model):
    reqs = requests(tiny_model, 2, seed=21)
    with InferenceClient(mono.socket, shm_replies=False) as plain:
        want = plain.predict(*reqs[0])
    fds_before = inference_fds(mono)
    r, w = os.pipe()
    cases = [
        (65536, None, "exactly one file descriptor"),
        (65536, r, "not a memfd"),
        (65536, sealed_memfd(65536, seals=0), "not sealed against shrinking"),
        (1 << 20, sealed_memfd(65536), "says 1048576 bytes but the memfd has 65536"),
        (512, sealed_memfd(512), "too small"),
        (1 << 40, sealed_memfd(8192), "says 1099511627776 bytes"),
    ]
    for declared, fd, why in cases:
        peer = RawPeer(mono.socket)
        peer.offer()
        h, body = peer.region(declared, fd)
        assert h.type == FrameType.ERROR and h.aux == ErrorCode.BAD_REQUEST, body
        assert why in codec.decode_error(body)
        # The same connection is still served, by frames.
        send_buffers(peer.sock, codec.encode_client_request(3, list(reqs[0][1]), [ln for _, ln in reqs[0][1].values()],
                                                            [v for v, _ in reqs[0][1].values()], 16, reqs[0][0]))
        h, body = peer.answer()
        assert h.type == FrameType.PREDICT_RESP and not h.flags & replyslot.REPLY_SLOT
        np.testing.assert_array_equal(codec.decode_scores(body, h.flags), want)
        peer.close()
        if fd is not None:
            os.close(fd)
    os.close(w)
    with InferenceClient(mono.socket) as good:
        assert good.shm_active
        np.testing.assert_array_equal(good.predict(*reqs[0]), want)
    assert inference_fds(mono) <= fds_before + 2    # every descriptor sent was closed (slack: the good client)


def test_slots_past_the_region_a_second_region_and_a_closed_fd(mono, tiny_model):
    (dense, sparse), = requests(tiny_model, 1, seed=22)
    names, lengths, values = list(sparse), [ln for _, ln in sparse.values()], [v for v, _ in sparse.values()]
    with InferenceClient(mono.socket, shm_replies=False) as plain:
        want = plain.predict(dense, sparse)
    peer = RawPeer(mono.socket)
    peer.offer()
    fd = sealed_memfd(65536)
    h, _ = peer.region(65536, fd)
    assert h.type == FrameType.REPLY_REGION
    os.close(fd)                      # the ranker holds its own descriptor; our mapping is what we read
    h, body = peer.region(65536, sealed_memfd(65536), rid=3)
    assert h.type == FrameType.ERROR and "one per connection" in codec.decode_error(body)
    for rid, (off, cap, why) in enumerate([(65536, 8, "past the end of the 65536-byte reply region"),
                                           (60000, 8192, "past the end"), (4, 64, "not a multiple of 8")], 10):
        frame = codec.encode_client_request(rid, names, lengths, values, 16, dense)
        send_buffers(peer.sock, replyslot.add_slot_trailer(frame, off, cap))
        h, body = peer.answer()
        assert h.type == FrameType.ERROR and h.aux == ErrorCode.BAD_REQUEST and h.request_id == rid
        assert why in codec.decode_error(body)
    frame = codec.encode_client_request(20, names, lengths, values, 16, dense)
    send_buffers(peer.sock, replyslot.add_slot_trailer(frame, 4096, 8192))
    h, body = peer.answer()
    assert h.type == FrameType.PREDICT_RESP and h.flags & replyslot.REPLY_SLOT
    off, nbytes = replyslot.decode_descriptor(body)
    assert off == 4096
    peer.close()                     # the ranker unmaps it; the good client below still gets its answers
    with InferenceClient(mono.socket) as good:
        np.testing.assert_array_equal(good.predict(dense, sparse), want)


@pytest.mark.parametrize("ranker", ["old", "refusing"])
def test_a_client_against_a_ranker_without_reply_regions_uses_frames(tmp_path, ranker):
    """An old ranker answers the flagged PING with a plain PONG; a full one refuses the region (OVERLOADED,
    naming its limit).  Either way the client sends no slot trailer and is answered by frames."""
    path = str(tmp_path / "old.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    seen: list = []
    refusal = "a reply region of 33554432 bytes would exceed the ranker's limit (max_reply_region_bytes)"

    def fake_ranker() -> None:
        conn, _ = listener.accept()
        with conn:
            while True:
                try:
                    h = unpack_header(recv_exact(conn, 32))
                except (ConnectionError, OSError):
                    return
                body = recv_exact(conn, h.payload_len) if h.payload_len else b""
                seen.append((h.type, h.flags, len(body)))
                if h.type == FrameType.PING:
                    flags = replyslot.REPLY_SLOT if ranker == "refusing" else 0
                    send_buffers(conn, [pack_header(FrameType.PONG, h.request_id, 0, flags=flags)])
                elif h.type == FrameType.REPLY_REGION:
                    send_buffers(conn, codec.encode_error(h.request_id, ErrorCode.OVERLOADED, refusal))
                else:
                    send_buffers(conn, codec.encode_scores(h.request_id, np.arange(2, dtype=np.float32)))

    t = threading.Thread(target=fake_ranker, daemon=True)
    t.start()
    with InferenceClient(path) as c:
        assert not c.shm_active
        assert c.shm_replies_error == (refusal if ranker == "refusing" else None)
        dense = np.zeros((2, 3), np.float32)
        np.testing.assert_array_equal(c.predict(dense, {"a": (np.array([1, 2], np.int64), np.array([1, 1], np.int32))}),
                                      [0, 1])
    t.join(10)
    listener.close()
    types = [ty for ty, _, _ in seen]
    assert types == ([FrameType.PING, FrameType.PREDICT] if ranker == "old"
                     else [FrameType.PING, FrameType.REPLY_REGION, FrameType.PREDICT])
    assert not seen[-1][1] & replyslot.REPLY_SLOT


def test_a_ranker_full_of_clients_is_reported_by_the_first_call_as_before(tmp_path):
    """The ranker's OVERLOADED at accept answers the region offer; the client's first call raises it."""
    from flexemr.errors import RemoteError

    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def full_ranker() -> None:
        conn, _ = listener.accept()
        with conn:
            send_buffers(conn, codec.encode_error(0, ErrorCode.OVERLOADED, "at most 1 clients ([ranker].max_clients)"))
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    t = threading.Thread(target=full_ranker, daemon=True)
    t.start()
    c = InferenceClient(path, timeout=10)
    with pytest.raises(RemoteError, match="max_clients"):
        c.predict(np.zeros((1, 3), np.float32), {"a": (np.array([1], np.int64), np.array([1], np.int32))})
    c.close()
    t.join(10)
    listener.close()
