"""Shared-memory requests, the parts that need no daemon: the request area, descriptors, span checks, reads.

Real memfds and real mappings; the socket front is in
tests/flexemrd/test_request_region_front.py and the daemon in
tests/integration/test_shm_requests.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.client_shm import ReplyRegion
from flexemr.errors import ProtocolError
from flexemr.wire import codec, replyslot, requestslot
from flexemr.wire.frame import FrameType, unpack_header

from flexemrd.inference.reply_region import RegionBudget, map_region


def _request(batch: int, seed: int, dense: bool = True, narrow: bool = True) -> tuple[list, tuple]:
    rng = np.random.default_rng(seed)
    names = ["a", "bb", "c"]
    lengths = [rng.integers(0, 6, batch).astype(np.int32) for _ in names]
    values = [rng.integers(0, 1000, int(ln.sum())).astype(np.int64) for ln in lengths]
    d = rng.standard_normal((batch, 5)).astype(np.float32) if dense else None
    args = (names, lengths, values, batch, d)
    frame = codec.encode_client_request(9, *args, timeout_ms=40, narrow_ids=narrow)
    return frame, args


def _write(region: ReplyRegion, args: tuple, narrow: bool = True) -> tuple[bytes, int] | None:
    return codec.write_client_request(region.request_area, 9, *args, timeout_ms=40, narrow_ids=narrow)


def _mapped(region: ReplyRegion):
    import os
    return map_region([os.dup(region.fd)], region.region_bytes, RegionBudget(1 << 30))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(0, 300), seed=st.integers(0, 1000), dense=st.booleans(), narrow=st.booleans())
def test_a_request_written_into_the_area_decodes_like_the_frame(batch, seed, dense, narrow):
    frame, args = _request(batch, seed, dense, narrow)
    names, lengths, values, _batch, d = args
    region = ReplyRegion(64 << 10, 2, request_bytes=1 << 20)
    mapped = _mapped(region)
    try:
        head, n = _write(region, args, narrow)
        # The same header and the same bytes as the frame (ids cast to their wire width on the way in).
        assert head == bytes(frame[0]) and n == replyslot.payload_bytes(frame)
        assert bytes(region.request_area[:n]) == b"".join(bytes(memoryview(b).cast("B")) for b in frame[1:])
        desc = requestslot.encode_descriptor([head], region.request_offset, n)
        h = unpack_header(desc[0])
        # Type, request id and timeout stay; the flag says where the payload is.
        assert (h.type, h.request_id, h.aux) == (unpack_header(frame[0]).type, 9, 40)
        assert h.flags & requestslot.REQUEST_SLOT and h.payload_len == requestslot.DESCRIPTOR_SIZE
        offset, nbytes = requestslot.decode_descriptor(desc[1])
        requestslot.check_span(offset, nbytes, mapped.nbytes)
        req = codec.decode_client_request(mapped.read(offset, nbytes), h.type)
        assert req.names == names and req.batch == batch
        for k in range(len(names)):
            v, ln = req.kjt.table(k)
            np.testing.assert_array_equal(v, values[k])
            np.testing.assert_array_equal(ln, lengths[k])
        if dense:
            np.testing.assert_array_equal(req.dense, d)
        else:
            assert req.dense is None and h.type == FrameType.CLIENT_LOOKUP
    finally:
        mapped.close()
        region.close()


def test_the_request_area_follows_the_reply_slots_and_a_request_too_big_for_it_is_refused():
    region = ReplyRegion(64 << 10, 4, request_bytes=8192)
    assert region.request_offset == 4 * region.slot_bytes
    assert region.region_bytes == region.request_offset + 8192
    slots = [region.acquire() for _ in range(4)]
    assert max(s.offset + s.capacity for s in slots) <= region.request_offset
    big, args = _request(400, 1)
    assert replyslot.payload_bytes(big) > 8192
    assert _write(region, args) is None                # the caller sends the frame instead
    assert _write(ReplyRegion(64 << 10, 4), args) is None   # without an area, nothing fits
    region.close()


def test_request_area_sizes_name_the_argument():
    with pytest.raises(ValueError, match="request_region_bytes"):
        ReplyRegion(64 << 10, 2, request_bytes=100)
    with pytest.raises(ValueError, match="request_region_bytes"):
        ReplyRegion.check_request_size(True)


def test_what_the_ranker_read_does_not_change_when_the_client_rewrites_its_area():
    _frame, args = _request(64, 3)
    values = args[2]
    region = ReplyRegion(64 << 10, 2, request_bytes=1 << 20)
    mapped = _mapped(region)
    _head, n = _write(region, args)
    payload = mapped.read(region.request_offset, n)
    # A hostile (or buggy) client rewrites the request after sending it: ids past every table.
    region._bytes[region.request_offset : region.request_offset + n] = 0xFF
    req = codec.decode_client_request(payload, FrameType.PREDICT)
    np.testing.assert_array_equal(req.kjt.table(0)[0], values[0])
    mapped.close()
    with pytest.raises(ValueError, match="closed"):
        mapped.read(region.request_offset, n)
    region.close()


@pytest.mark.parametrize("offset, nbytes, slot, why", [
    (4, 64, None, "not a multiple of 8"),
    (0, 0, None, "0 bytes long"),
    (65536, 8, None, "past the end of the 65536-byte shared region"),
    (60000, 8192, None, "past the end"),
    (2**63, 2**63, None, "past the end"),
    (4096, 4096, (0, 8192), "overlap the reply slot [0, 8192)"),
    (0, 8192, (4096, 64), "overlap the reply slot [4096, 4160)"),
])
def test_bad_spans_name_what_is_wrong(offset, nbytes, slot, why):
    with pytest.raises(ProtocolError, match=__import__("re").escape(why)):
        requestslot.check_span(offset, nbytes, 65536, slot)


def test_adjacent_spans_are_fine_and_bad_descriptors_name_their_size():
    requestslot.check_span(8192, 4096, 65536, (0, 8192))
    requestslot.check_span(0, 8192, 65536, (8192, 8192))
    with pytest.raises(ProtocolError, match="7-byte payload, expected its 16-byte descriptor"):
        requestslot.decode_descriptor(b"\0" * 7)
