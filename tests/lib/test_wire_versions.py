"""Model versions on the wire: LOOKUP/FETCH name a version, answers carry it, MODEL frames round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.errors import ProtocolError
from flexemr.wire import codec
from flexemr.wire.frame import FrameFlag, unpack_header


def _split(frame: list):
    h = unpack_header(frame[0])
    return h, b"".join(bytes(memoryview(b).cast("B")) for b in frame[1:])


@pytest.mark.parametrize("budget, credits", [(0, False), (1500, False), (0, True), (1500, True)])
def test_lookup_names_its_version_beside_the_deadline_and_credit_trailers(budget, credits):
    values = [np.array([3, 1, 4], np.int64)]
    frame = codec.encode_lookup(7, 2, [0], [np.array([2, 1], np.int32)], values, credit_trailer=credits,
                                budget_us=budget, version=42)
    h, payload = _split(frame)
    assert h.flags & FrameFlag.MODEL_VERSION
    req = codec.decode_lookup(payload, h.flags)
    assert req.version == 42 and req.budget_us == budget
    np.testing.assert_array_equal(req.kjt.table(0)[0], values[0])


def test_a_lookup_without_version_is_version_0_and_a_flagged_version_0_is_refused():
    frame = codec.encode_lookup(1, 1, [0], [np.array([1], np.int32)], [np.array([5], np.int64)])
    h, payload = _split(frame)
    assert not h.flags & FrameFlag.MODEL_VERSION and codec.decode_lookup(payload, h.flags).version == 0
    with pytest.raises(ProtocolError, match="version 0"):
        codec.decode_lookup(payload + bytes(8), FrameFlag.MODEL_VERSION)


def test_fetch_and_answers_carry_the_version():
    h, payload = _split(codec.encode_fetch(3, 2, np.array([9, 8], np.int64), version=5))
    assert codec.fetch_version(payload, h.flags) == 5 and codec.decode_fetch(payload)[0] == 2
    h, payload = _split(codec.encode_scores(4, np.array([0.5, 0.25], np.float32), version=6))
    assert codec.scores_version(payload, h.flags) == 6 and h.aux == 2
    np.testing.assert_array_equal(codec.decode_scores(payload, h.flags), [0.5, 0.25])
    h, payload = _split(codec.encode_pooled(5, ["t0"], [np.ones((2, 3), np.float32)], version=7))
    assert codec.pooled_version(payload) == 7 and codec.decode_pooled(payload)["t0"].shape == (2, 3)


def test_model_frames_round_trip():
    h, payload = _split(codec.encode_model(1, codec.ModelOp.LOAD_DELTA, 3, 2, "/models/delta-3"))
    req = codec.decode_model(payload)
    assert (req.op, req.version, req.base, req.path) == (codec.ModelOp.LOAD_DELTA, 3, 2, "/models/delta-3")
    st = codec.ModelStatus({2: (codec.VersionState.LIVE, 0, 0.5), 3: (codec.VersionState.FAILED, 2, 0.0)},
                           100, 200, "version 3: missing delta/")
    h, payload = _split(codec.encode_model_status(1, st))
    got = codec.decode_model_status(payload)
    assert got.versions == st.versions and (got.rss_bytes, got.peak_rss_bytes) == (100, 200)
    assert got.message == st.message
