"""Wire protocol: every frame type round-trips; hostile bytes only ever raise ProtocolError.

Properties checked here, each of which a peer would notice if broken:

* encode -> bytes -> decode gives back what was encoded, for every frame type,
  including zero bags, zero tables and zero ids;
* a truncated, random or field-corrupted payload raises ProtocolError (never
  IndexError, ValueError, UnicodeDecodeError, ...) and never allocates more than
  a small multiple of the payload, whatever sizes it claims;
* a header claiming more than the receiver's limit is refused from its 32
  bytes, before anything is allocated or read;
* ``send_buffers`` + ``FrameReader`` carry frames intact over a real socket,
  through partial sends, frames larger than the socket buffers and more
  buffers than one ``sendmsg`` takes.
"""

from __future__ import annotations

import socket
import struct
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flexemr.errors import ProtocolError
from flexemr.wire import codec
from flexemr.wire.frame import (
    CLIENT_VERSION,
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    ErrorCode,
    FrameFlag,
    FrameType,
    pack_header,
    unpack_header,
)
from flexemr.wire.stream import FrameReader, send_buffers

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _bytes(buffers: list) -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in buffers)


def _split(buffers: list, max_payload: int = DEFAULT_MAX_PAYLOAD):
    """(header, payload bytes) of an encoded frame, checking the header's length field."""
    raw = _bytes(buffers)
    h = unpack_header(raw[:HEADER_SIZE], max_payload)
    payload = raw[HEADER_SIZE:]
    assert h.payload_len == len(payload), "header length disagrees with the bytes encoded"
    return h, payload


# ------------------------------------------------------------------ strategies

ids64 = st.integers(-(2**63), 2**63 - 1)
ids32 = st.integers(-(2**31), 2**31 - 1)
names_st = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=12)


@st.composite
def kjt(draw, max_tables: int = 4, max_batch: int = 6, max_len: int = 5):
    """(batch, lengths per table, values per table): zero bags, zero tables and zero ids included.

    The ids are int64 over their whole range or int32 (the narrow wire form of protocol 2).
    """
    t = draw(st.integers(0, max_tables))
    b = draw(st.integers(0, max_batch))
    narrow = draw(st.booleans())
    ids, dtype = (ids32, np.int32) if narrow else (ids64, np.int64)
    lengths, values = [], []
    for _ in range(t):
        ln = np.array(draw(st.lists(st.integers(0, max_len), min_size=b, max_size=b)), dtype=np.int32)
        v = np.array(draw(st.lists(ids, min_size=int(ln.sum()), max_size=int(ln.sum()))), dtype=dtype)
        lengths.append(ln)
        values.append(v)
    return b, lengths, values


def f32_arrays(shape):
    return st.builds(
        lambda seed: np.random.default_rng(seed).standard_normal(shape, dtype=np.float32),
        st.integers(0, 2**32 - 1),
    )


@st.composite
def pooled_st(draw, max_tables: int = 4):
    b = draw(st.integers(0, 6))
    dims = draw(st.lists(st.integers(1, 9), max_size=max_tables))
    return b, [draw(f32_arrays((b, d))) for d in dims]


def _assert_kjt(got: codec.KJT, batch: int, lengths, values) -> None:
    assert got.batch == batch
    assert got.lengths.shape == (len(lengths), batch)
    for i, (ln, v) in enumerate(zip(lengths, values)):
        gv, gl = got.table(i)
        np.testing.assert_array_equal(gl, ln)
        np.testing.assert_array_equal(gv, v)
        # int32 on the wire exactly when every non-empty table's ids were int32 (nothing narrowed silently)
        assert gv.dtype == codec.ids_wire_dtype(values) and gl.dtype == np.int32


# ------------------------------------------------------------------ round trips


@FAST
@given(k=kjt(), rid=st.integers(0, 2**64 - 1), inband=st.booleans(), as_matrix=st.booleans(),
       credits=st.integers(0, 2**32 - 1), data=st.data())
def test_lookup_round_trip(k, rid, inband, as_matrix, credits, data):
    batch, lengths, values = k
    tids = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=len(lengths), max_size=len(lengths)))
    ln_arg = np.array(lengths, dtype=np.int32).reshape(len(lengths), batch) if as_matrix else lengths
    flags = int(FrameFlag.INBAND_CREDIT) if inband else 0
    frame = codec.encode_lookup(rid, batch, tids, ln_arg, values, aux=credits if inband else 0, flags=flags,
                                credit_trailer=inband)
    h, payload = _split(frame)
    assert (h.type, h.request_id, h.flags) == (FrameType.LOOKUP, rid, flags)
    assert len(payload) % 8 == 0, "sections are 8-byte aligned, so the payload is too"
    if inband:
        # The engine fills credits and grant time in place just before sending.
        payload = payload[:-8] + struct.pack("<Q", 123456789)
        assert codec.inband_grant_ns(payload) == 123456789
    req = codec.decode_lookup(payload, h.flags)
    np.testing.assert_array_equal(req.table_ids, np.array(tids, dtype=np.uint32))
    _assert_kjt(req.kjt, batch, lengths, values)


@FAST
@given(p=pooled_st(), rid=st.integers(0, 2**64 - 1), data=st.data())
def test_lookup_response_round_trip(p, rid, data):
    batch, pooled = p
    tids = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=len(pooled), max_size=len(pooled)))
    h, payload = _split(codec.encode_lookup_response(rid, np.array(tids, dtype=np.uint32), pooled))
    assert (h.type, h.request_id) == (FrameType.LOOKUP_RESP, rid)
    # The documented layout: every section starts on an 8-byte boundary.
    a8 = lambda n: n + (-n & 7)  # noqa: E731
    assert len(payload) == 8 + 3 * a8(4 * len(pooled)) + sum(a8(q.nbytes) for q in pooled)  # tids, dims, bags
    # ... which is what a receiver reserving its slot up front computes.
    assert codec.lookup_response_size(batch, [q.shape[1] for q in pooled]) == len(payload)
    got_tids, got = codec.decode_lookup_response(payload)
    np.testing.assert_array_equal(got_tids, tids)
    assert len(got) == len(pooled)
    for g, w in zip(got, pooled):
        np.testing.assert_array_equal(g, w)  # bit exact: float32 travels as is


@FAST
@given(tid=st.integers(0, 2**32 - 1), ids=st.lists(ids64, max_size=20), dim=st.integers(1, 9),
       seed=st.integers(0, 2**32 - 1), rid=st.integers(0, 2**64 - 1))
def test_fetch_and_fetch_response_round_trip(tid, ids, dim, seed, rid):
    ids = np.array(ids, dtype=np.int64)
    h, payload = _split(codec.encode_fetch(rid, tid, ids))
    assert (h.type, h.request_id) == (FrameType.FETCH, rid)
    got_tid, got_ids = codec.decode_fetch(payload)
    assert got_tid == tid
    np.testing.assert_array_equal(got_ids, ids)

    rows = np.random.default_rng(seed).standard_normal((len(ids), dim), dtype=np.float32)
    h, payload = _split(codec.encode_fetch_response(rid, tid, rows))
    assert (h.type, h.request_id) == (FrameType.FETCH_RESP, rid)
    got_tid, got_rows = codec.decode_fetch_response(payload)
    assert got_tid == tid
    assert got_rows.shape == rows.shape
    np.testing.assert_array_equal(got_rows, rows)


@FAST
@given(k=kjt(), predict=st.booleans(), nfeat=st.integers(0, 7), seed=st.integers(0, 2**32 - 1),
       rid=st.integers(0, 2**64 - 1), data=st.data())
def test_client_request_round_trip(k, predict, nfeat, seed, rid, data):
    batch, lengths, values = k
    names = data.draw(st.lists(names_st, min_size=len(lengths), max_size=len(lengths)))
    dense = np.random.default_rng(seed).standard_normal((batch, nfeat), dtype=np.float32) if predict else None
    h, payload = _split(codec.encode_client_request(rid, names, lengths, values, batch, dense))
    assert h.type == (FrameType.PREDICT if predict else FrameType.CLIENT_LOOKUP) and h.request_id == rid
    req = codec.decode_client_request(payload, h.type)
    assert req.names == names
    assert req.batch == batch
    if predict:
        assert req.dense.shape == (batch, nfeat)
        np.testing.assert_array_equal(req.dense, dense)
    else:
        assert req.dense is None
    _assert_kjt(req.kjt, batch, lengths, values)


def test_client_request_rejects_a_name_with_a_newline():
    with pytest.raises(ValueError, match="newline"):
        codec.encode_client_request(1, ["a\nb"], [np.zeros(1, np.int32)], [np.zeros(0, np.int64)], 1)


@FAST
@given(n=st.integers(0, 40), seed=st.integers(0, 2**32 - 1), rid=st.integers(0, 2**64 - 1))
def test_scores_round_trip(n, seed, rid):
    scores = np.random.default_rng(seed).random(n, dtype=np.float32)
    h, payload = _split(codec.encode_scores(rid, scores))
    assert (h.type, h.request_id, h.aux) == (FrameType.PREDICT_RESP, rid, n)
    np.testing.assert_array_equal(codec.decode_scores(payload), scores)


@FAST
@given(p=pooled_st(), rid=st.integers(0, 2**64 - 1), data=st.data())
def test_client_lookup_response_round_trip(p, rid, data):
    batch, pooled = p
    names = data.draw(st.lists(names_st, min_size=len(pooled), max_size=len(pooled), unique=True))
    h, payload = _split(codec.encode_pooled(rid, names, pooled))
    assert (h.type, h.request_id) == (FrameType.CLIENT_LOOKUP_RESP, rid)
    got = codec.decode_pooled(payload)
    assert list(got) == names
    for n, w in zip(names, pooled):
        assert got[n].shape == (batch, w.shape[1])
        np.testing.assert_array_equal(got[n], w)


@FAST
@given(code=st.sampled_from(list(ErrorCode)), msg=st.text(max_size=200), rid=st.integers(0, 2**64 - 1))
def test_error_round_trip(code, msg, rid):
    h, payload = _split(codec.encode_error(rid, code, msg))
    assert (h.type, h.request_id, h.aux) == (FrameType.ERROR, rid, int(code))
    assert codec.decode_error(payload) == msg.encode("utf-8", "replace").decode("utf-8", "replace")


def test_error_message_is_capped_at_64_kib():
    h, payload = _split(codec.encode_error(1, ErrorCode.INTERNAL, "x" * 1_000_000))
    assert len(payload) == 65536 and codec.decode_error(payload) == "x" * 65536


@FAST
@given(role=st.sampled_from([codec.ROLE_RANKER, codec.ROLE_EMBEDDING, codec.ROLE_CLIENT]),
       name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40),
       shards=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                                 st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=6),
       aux=st.integers(0, 2**32 - 1))
def test_hello_round_trip(role, name, shards, aux):
    frame = codec.encode_hello(0, role, name, shards)
    frame[0] = pack_header(FrameType.HELLO, 0, struct.unpack_from("<Q", frame[0], 24)[0], aux=aux)
    h, payload = _split(frame)
    assert (h.type, h.aux) == (FrameType.HELLO, aux)
    hello = codec.decode_hello(payload)
    assert hello.role == role
    # The name must come back exactly: the server parses "<token>/<conn>/<data|credit>"
    # out of it, and a trailing NUL of padding turns "data" into something else.
    assert hello.name == name
    assert [tuple(int(x) for x in r) for r in hello.shards] == shards


@FAST
@given(credits=st.integers(0, 2**32 - 1), sent=st.integers(0, 2**64 - 1), conn=st.integers(0, 2**64 - 1))
def test_credit_round_trip(credits, sent, conn):
    h, payload = _split(codec.encode_credit(conn, credits, sent))
    assert (h.type, h.request_id, h.aux) == (FrameType.CREDIT, conn, credits)
    assert codec.decode_credit(payload) == sent


@FAST
@given(values=st.lists(st.integers(0, 2**64 - 1), min_size=len(codec.SERVER_STATS),
                       max_size=len(codec.SERVER_STATS)))
def test_stats_round_trip(values):
    h, payload = _split(codec.encode_stats(9, values))
    assert h.type == FrameType.STATS_RESP
    assert codec.decode_stats(payload) == dict(zip(codec.SERVER_STATS, values))


# ------------------------------------------------------------------ hostile payloads

# Self-describing payloads: every size is in the payload, so losing any byte
# other than trailing padding must be detected.
_DECODERS = {
    "LOOKUP": lambda p: codec.decode_lookup(p),
    "LOOKUP/inband": lambda p: codec.decode_lookup(p, int(FrameFlag.INBAND_CREDIT)),
    "LOOKUP_RESP": codec.decode_lookup_response,
    "FETCH": codec.decode_fetch,
    "FETCH_RESP": codec.decode_fetch_response,
    "PREDICT": lambda p: codec.decode_client_request(p, FrameType.PREDICT),
    "CLIENT_LOOKUP": lambda p: codec.decode_client_request(p, FrameType.CLIENT_LOOKUP),
    "PREDICT_RESP": codec.decode_scores,
    "CLIENT_LOOKUP_RESP": codec.decode_pooled,
    "ERROR": codec.decode_error,
    "HELLO": codec.decode_hello,
    "CREDIT": codec.decode_credit,
    "STATS_RESP": codec.decode_stats,
    "inband_grant_ns": codec.inband_grant_ns,
}


def _sample_payloads() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    lengths = [np.array([2, 0, 3], np.int32), np.array([1, 1, 0], np.int32)]
    values = [np.array([5, 6, 7, 8, 9], np.int64), np.array([1, 2], np.int64)]
    pooled = [rng.standard_normal((3, 5), dtype=np.float32), rng.standard_normal((3, 2), dtype=np.float32)]
    dense = rng.standard_normal((3, 3), dtype=np.float32)
    frames = {
        "LOOKUP": codec.encode_lookup(1, 3, [0, 2], lengths, values),
        "LOOKUP/inband": codec.encode_lookup(1, 3, [0, 2], lengths, values, credit_trailer=True),
        "LOOKUP_RESP": codec.encode_lookup_response(1, np.array([0, 2], np.uint32), pooled),
        "FETCH": codec.encode_fetch(1, 3, np.array([4, 5, 6], np.int64)),
        "FETCH_RESP": codec.encode_fetch_response(1, 3, pooled[0]),
        "PREDICT": codec.encode_client_request(1, ["t0", "tbl1"], lengths, values, 3, dense),
        "CLIENT_LOOKUP": codec.encode_client_request(1, ["t0", "tbl1"], lengths, values, 3),
        "PREDICT_RESP": codec.encode_scores(1, np.array([0.5, 0.25, 1.0], np.float32)),
        "CLIENT_LOOKUP_RESP": codec.encode_pooled(1, ["t0", "tbl1"], pooled),
        "ERROR": codec.encode_error(1, ErrorCode.BAD_FRAME, "bad frame: the magic is wrong"),
        "HELLO": codec.encode_hello(1, codec.ROLE_EMBEDDING, "embedding[0]", [(0, 5, 0, 10), (2, 2, 3, 9)]),
        "CREDIT": codec.encode_credit(1, 4, 77),
        "STATS_RESP": codec.encode_stats(1, list(range(len(codec.SERVER_STATS)))),
    }
    out = {k: _split(f)[1] for k, f in frames.items()}
    out["inband_grant_ns"] = out["LOOKUP/inband"]
    return out


SAMPLES = _sample_payloads()
# Decoders whose item count is implied by the payload length: a prefix cut at an
# item boundary is itself a valid, shorter payload.
_LENGTH_IMPLIED = {"FETCH", "FETCH_RESP", "PREDICT_RESP", "ERROR", "HELLO", "STATS_RESP", "inband_grant_ns"}


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__slots__") and not isinstance(a, (int, str, bytes)):
        return type(a) is type(b) and all(_same(getattr(a, s), getattr(b, s)) for s in a.__slots__)
    return a == b


def _decode_bounded(kind: str, payload: bytes):
    """Decode; only ProtocolError may escape, and allocations stay near the payload's size."""
    tracemalloc.start()
    try:
        try:
            return _DECODERS[kind](payload)
        except ProtocolError as e:
            assert str(e), "a ProtocolError must say what is wrong"
            return e
    finally:
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 64 * 1024 + 16 * len(payload), f"{kind}: decoding {len(payload)} bytes allocated {peak}"


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_every_truncation_raises_protocol_error_or_loses_only_padding(kind):
    full = SAMPLES[kind]
    want = _DECODERS[kind](full)
    for cut in range(len(full)):
        got = _decode_bounded(kind, full[:cut])
        if isinstance(got, ProtocolError):
            continue
        if kind in _LENGTH_IMPLIED:
            continue  # a shorter payload of the same kind; the receiver sees fewer items
        # Accepted: then only trailing padding was lost and the content is intact.
        assert _same(got, want), f"{kind} cut to {cut} of {len(full)} bytes decoded to different content"
        assert cut >= len(full) - 7


@pytest.mark.parametrize("kind", sorted(_DECODERS))
@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(kind, blob):
    _decode_bounded(kind, blob)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_fields_raise_only_protocol_error(kind, data):
    """Overwrite one aligned 4- or 8-byte field (a count, length, dim, id ...) with a hostile value."""
    full = bytearray(SAMPLES[kind])
    assume(len(full) >= 4)
    width = data.draw(st.sampled_from([4, 8]) if len(full) >= 8 else st.just(4))
    off = data.draw(st.integers(0, (len(full) - width) // 4)) * 4
    top = 2**(8 * width) - 1
    value = data.draw(st.sampled_from([0, 1, 7, top, top >> 1, top >> 2, 2**31, 2**31 - 1])
                      | st.integers(0, top))
    full[off:off + width] = value.to_bytes(width, "little")
    _decode_bounded(kind, bytes(full))


def test_lookup_rejects_lengths_that_disagree_with_counts():
    lengths = [np.array([2, 1], np.int32)]
    values = [np.array([1, 2, 3], np.int64)]
    payload = bytearray(_split(codec.encode_lookup(1, 2, [0], lengths, values))[1])
    # Layout: u32 B, u32 T | u32 tids[1] pad 4 | u32 bags[1] pad 4 | u32 id_bytes, u32 0 | i64 counts[1]
    #         | i32 lengths[2] | i64 values[3]
    struct.pack_into("<i", payload, 40, 3)  # bag 0 claims 3 ids: lengths sum to 4, counts say 3
    with pytest.raises(ProtocolError, match="sum to 4 but 3") as e:
        codec.decode_lookup(bytes(payload))
    assert e.value.code == ErrorCode.SIZE_MISMATCH
    struct.pack_into("<i", payload, 40, -1)
    struct.pack_into("<i", payload, 44, 4)
    with pytest.raises(ProtocolError, match="negative bag length") as e:
        codec.decode_lookup(bytes(payload))
    assert e.value.code == ErrorCode.SIZE_MISMATCH


def test_huge_counts_are_refused_without_allocating():
    """A LOOKUP announcing 2^32-1 tables x 2^32-1 bags in 16 bytes is a size mismatch, not a 64 GiB array."""
    payload = struct.pack("<II", 2**32 - 1, 2**32 - 1) + bytes(8)
    got = _decode_bounded("LOOKUP", payload)
    assert isinstance(got, ProtocolError) and got.code == ErrorCode.SIZE_MISMATCH


def test_pooled_response_names_must_match_the_table_count():
    payload = bytearray(SAMPLES["CLIENT_LOOKUP_RESP"])
    struct.pack_into("<I", payload, 4, 3)  # 3 tables announced, 2 names sent
    with pytest.raises(ProtocolError, match="3 tables announced"):
        codec.decode_pooled(bytes(payload))


# ------------------------------------------------------------------ headers


def test_header_layout_is_32_bytes_little_endian():
    raw = pack_header(FrameType.LOOKUP, 0x0102030405060708, 40, aux=9, flags=1)
    assert len(raw) == HEADER_SIZE == 32
    assert raw[:4] == MAGIC == b"FXMR"
    assert struct.unpack("<HHIIQQ", raw[4:]) == (VERSION, FrameType.LOOKUP, 1, 9, 0x0102030405060708, 40)


@pytest.mark.parametrize("plen", [2**60, 2**64 - 1, DEFAULT_MAX_PAYLOAD + 1])
def test_header_over_the_limit_is_refused_from_the_header_alone(plen):
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            unpack_header(pack_header(FrameType.LOOKUP, 1, plen))
        _c, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert unpack_header(pack_header(FrameType.LOOKUP, 1, 100), max_payload=100).payload_len == 100
    with pytest.raises(ProtocolError):
        unpack_header(pack_header(FrameType.LOOKUP, 1, 101), max_payload=100)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=40))
def test_random_headers_raise_protocol_error_or_are_valid(blob):
    try:
        h = unpack_header(blob, max_payload=1 << 20)
    except ProtocolError:
        return
    assert blob[:4] == MAGIC and h.payload_len <= 1 << 20 and h.type in set(FrameType)


@settings(max_examples=300, deadline=None)
@given(ftype=st.sampled_from(list(FrameType)), rid=st.integers(0, 2**64 - 1), plen=st.integers(0, 1 << 20),
       bit=st.integers(0, HEADER_SIZE * 8 - 1))
def test_bit_flipped_header(ftype, rid, plen, bit):
    raw = bytearray(pack_header(ftype, rid, plen))
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        h = unpack_header(bytes(raw), max_payload=1 << 20)
    except ProtocolError:
        return
    # Accepted only when magic is intact and the version one this peer speaks for the type (a flip of
    # protocol 3's low bit gives 2, the client protocol, which client-facing types such as ERROR carry),
    # and the length within the limit.
    magic, version = HEADER.unpack_from(bytes(raw), 0)[:2]
    assert magic == MAGIC and version in (VERSION, CLIENT_VERSION), "a flip in magic or version must be refused"
    assert h.payload_len <= 1 << 20 and h.type in set(FrameType)


def test_truncated_header_is_a_protocol_error():
    raw = pack_header(FrameType.PING, 1, 0)
    for n in range(HEADER_SIZE):
        with pytest.raises(ProtocolError, match="truncated header"):
            unpack_header(raw[:n])


# ------------------------------------------------------------------ send_buffers with partial sends


class _TrickleSocket:
    """sendmsg takes at most a few bytes per call, as a loaded kernel may."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = steps or [1]
        self.calls = 0
        self.out = bytearray()
        self.max_iov = 0

    def sendmsg(self, buffers):
        self.max_iov = max(self.max_iov, len(buffers))
        avail = sum(len(b) for b in buffers)
        k = min(avail, self.steps[self.calls % len(self.steps)])
        self.calls += 1
        left = k
        for b in buffers:
            take = min(left, len(b))
            self.out += bytes(b[:take])
            left -= take
            if not left:
                break
        return k


@FAST
@given(k=kjt(max_tables=5, max_batch=5), steps=st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_send_buffers_survives_any_partial_send(k, steps):
    batch, lengths, values = k
    frame = codec.encode_lookup(5, batch, list(range(len(lengths))), lengths, values)
    sock = _TrickleSocket(steps)
    n = send_buffers(sock, frame)
    assert bytes(sock.out) == _bytes(frame) and n == len(sock.out)


def test_send_buffers_splits_more_buffers_than_one_sendmsg_takes():
    # 700 tables: 1,400+ buffers, over IOV_MAX (1024) for one sendmsg.
    lengths = [np.array([1], np.int32) for _ in range(700)]
    values = [np.array([i], np.int64) for i in range(700)]
    frame = codec.encode_lookup(5, 1, list(range(700)), lengths, values)
    assert len(frame) > 1024
    sock = _TrickleSocket([10**9])
    send_buffers(sock, frame)
    assert bytes(sock.out) == _bytes(frame)
    assert sock.max_iov <= 1024


# ------------------------------------------------------------------ FrameReader over a socketpair


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)  # a bug that hangs fails the test instead of the suite
    # Small kernel buffers: big frames go out in many partial sends.
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    yield a, b
    a.close()
    b.close()


def _sender(sock: socket.socket, frames: list[list]) -> threading.Thread:
    errors: list = []

    def run():
        try:
            for f in frames:
                send_buffers(sock, f)
        except Exception as e:  # surfaced by the test through .errors
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors
    t.start()
    return t


def test_frame_reader_reads_what_send_buffers_sent_including_a_10_mb_frame(pair):
    a, b = pair
    rng = np.random.default_rng(3)
    big = rng.standard_normal((41_000, 64), dtype=np.float32)  # 10.5 MB
    assert big.nbytes > 8 * 2**20
    lengths = [np.array([2, 0, 1], np.int32)]
    values = [np.array([7, 8, 9], np.int64)]
    frames = [
        codec.encode_lookup(1, 3, [4], lengths, values),
        codec.encode_fetch_response(2, 4, big),
        [pack_header(FrameType.PING, 3, 0)],
        codec.encode_lookup_response(4, np.array([4], np.uint32), [big[:3, :5]]),
    ]
    t = _sender(a, frames)
    r = FrameReader(b)
    h, p = r.read_frame()
    assert (h.type, h.request_id) == (FrameType.LOOKUP, 1)
    _assert_kjt(codec.decode_lookup(p).kjt, 3, lengths, values)
    h = r.read_header()
    assert (h.type, h.request_id) == (FrameType.FETCH_RESP, 2)
    p = r.read_payload_owned(h)  # the caller keeps it: it must survive later reads
    tid, rows = codec.decode_fetch_response(p)
    h, ping = r.read_frame()
    assert (h.type, h.request_id, len(ping)) == (FrameType.PING, 3, 0)
    h, p2 = r.read_frame()
    _, small = codec.decode_lookup_response(p2)
    t.join(20)
    assert not t.is_alive() and not t.errors
    assert tid == 4 and rows.shape == big.shape
    np.testing.assert_array_equal(rows, big)
    np.testing.assert_array_equal(small[0], big[:3, :5])


def test_frame_over_max_payload_is_refused_then_skipped_and_the_stream_resyncs(pair):
    a, b = pair
    limit = 1 << 20
    big = np.ones((limit // 4 + 100,), dtype=np.float32)
    t = _sender(a, [codec.encode_scores(1, big), codec.encode_scores(2, np.array([3.0], np.float32))])
    r = FrameReader(b, max_payload=limit)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            r.read_header()
        # What a server does with it: it knows the length, so it discards the bytes in bounded chunks.
        magic, version, ftype, _f, _a, rid, plen = r.raw_header_fields()
        assert (ftype, rid, plen) == (FrameType.PREDICT_RESP, 1, big.nbytes)
        r.skip(plen)
        _c, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"refusing a {plen}-byte frame allocated {peak} bytes"
    h, p = r.read_frame()
    assert h.request_id == 2 and codec.decode_scores(p).tolist() == [3.0]
    t.join(5)


def test_header_claiming_2_to_the_60_is_refused_before_any_read(pair):
    a, b = pair
    a.sendall(pack_header(FrameType.LOOKUP, 1, 2**60))  # and nothing else: reading on would hang
    r = FrameReader(b)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            r.read_header()
        _c, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 and len(r._buf) == 0


def test_peer_closing_mid_frame_is_a_connection_error_not_a_hang(pair):
    a, b = pair
    raw = _bytes(codec.encode_scores(1, np.arange(100, dtype=np.float32)))
    a.sendall(raw[:20])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError):
        FrameReader(b).read_header()

    c, d = socket.socketpair()
    with c, d:
        d.settimeout(5)
        c.sendall(raw[:100])
        c.shutdown(socket.SHUT_WR)
        r = FrameReader(d)
        h = r.read_header()
        with pytest.raises(ConnectionError, match="after 68 of 400 bytes"):
            r.read_payload(h)


def test_garbage_on_the_stream_is_a_protocol_error(pair):
    a, b = pair
    a.sendall(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"[:HEADER_SIZE])
    with pytest.raises(ProtocolError, match="bad magic"):
        FrameReader(b).read_header()
    bad_version = bytearray(pack_header(FrameType.PING, 1, 0))
    struct.pack_into("<H", bad_version, 4, VERSION + 1)
    a.sendall(bytes(bad_version))
    with pytest.raises(ProtocolError, match="version"):
        FrameReader(b).read_header()
    assert HEADER.unpack(bytes(bad_version))[1] == VERSION + 1


# ------------------------------------------------------------------ protocol 2: int32 ids


def test_int32_ids_halve_the_id_bytes_and_decode_to_the_same_ids():
    rng = np.random.default_rng(5)
    lengths = [np.full(256, 20, np.int32) for _ in range(3)]
    values = [rng.integers(0, 2**31 - 1, 256 * 20, dtype=np.int64) for _ in range(3)]
    wide = codec.encode_lookup(1, 256, [0, 1, 2], lengths, values)
    narrow = codec.encode_lookup(1, 256, [0, 1, 2], lengths, values, narrow_ids=True)
    _, wide_payload = _split(wide)
    _, narrow_payload = _split(narrow)
    assert len(wide_payload) - len(narrow_payload) == 4 * 3 * 256 * 20
    req = codec.decode_lookup(narrow_payload)
    for i, v in enumerate(values):
        got, _ln = req.kjt.table(i)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, v)


def test_int64_ids_that_do_not_fit_int32_stay_int64():
    big = np.array([2**31, 5], np.int64)
    assert not codec.fits_int32(big)
    assert not codec.fits_int32(np.array([-1], np.int64)), "a negative id must not be narrowed"
    assert codec.fits_int32(np.array([2**31 - 1, 0], np.int64))
    frame = codec.encode_client_request(1, ["t"], [np.array([2], np.int32)], [big], 1)
    _, payload = _split(frame)
    got, _ = codec.decode_client_request(payload, FrameType.CLIENT_LOOKUP).kjt.table(0)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, big)


def test_a_kjt_block_with_an_unknown_id_width_is_refused_by_name():
    frame = codec.encode_lookup(1, 1, [0], [np.array([1], np.int32)], [np.array([3], np.int64)])
    _, payload = _split(frame)
    bad = bytearray(payload)
    # LOOKUP: u32 B, u32 T | u32 table_ids (padded to 8) | u32 bags (padded to 8) | u32 id_bytes ...
    struct.pack_into("<I", bad, 24, 2)
    with pytest.raises(ProtocolError, match="ids are 2 bytes wide"):
        codec.decode_lookup(bytes(bad))


# ------------------------------------------------------------------ protocol 2: reduced-precision partials


@pytest.mark.parametrize("partials, rel, floor", [("fp32", 0.0, 0.0), ("fp16", 2.0**-11, 2.0**-25),
                                                  ("bf16", 2.0**-8, 0.0)])
def test_partials_travel_in_the_asked_precision_within_the_stated_bound(partials, rel, floor):
    rng = np.random.default_rng(3)
    pooled = [(rng.standard_normal((64, 16)) * 10.0 ** rng.integers(-3, 3, (64, 1))).astype(np.float32)
              for _ in range(2)]
    h, payload = _split(codec.encode_lookup_response(9, np.array([4, 7], np.uint32), pooled, partials=partials))
    width = {"fp32": 4, "fp16": 2, "bf16": 2}[partials]
    assert len(payload) == codec.lookup_response_size(64, [16, 16], partials)
    assert len(payload) == 8 + 8 + 8 + 8 + 2 * 64 * 16 * width   # head, tids, dims, bags, partials
    tids, got = codec.decode_lookup_response(payload)
    np.testing.assert_array_equal(tids, [4, 7])
    for g, p in zip(got, pooled):
        assert g.dtype == np.float32 and g.shape == p.shape
        # One rounding to nearest: |error| <= rel * |x|, or half fp16's smallest step below 2^-14
        assert np.all(np.abs(g - p) <= rel * np.abs(p) + floor)


def test_fp16_partials_a_half_cannot_hold_travel_as_fp32_not_as_inf():
    big = [np.array([[70000.0, -1.0]], np.float32)]
    _, payload = _split(codec.encode_lookup_response(1, np.array([0], np.uint32), big, partials="fp16"))
    _, got = codec.decode_lookup_response(payload)
    np.testing.assert_array_equal(got[0], big[0])


def test_partials_flags_round_trip_and_a_bad_precision_is_refused():
    for p in ("fp32", "fp16", "bf16"):
        assert codec.partials_of_flags(codec.partials_flags(p) | int(FrameFlag.DEADLINE)) == p
    with pytest.raises(ValueError, match="partials must be one of"):
        codec.partials_flags("fp8")
    _, payload = _split(codec.encode_lookup_response(1, np.array([0], np.uint32), [np.zeros((1, 2), np.float32)]))
    bad = bytearray(payload)
    struct.pack_into("<H", bad, 6, 3)
    with pytest.raises(ProtocolError, match="unknown partials precision 3"):
        codec.decode_lookup_response(bytes(bad))
