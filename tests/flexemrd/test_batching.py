"""Request validation and incremental global pooling in the inference process."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.errors import RequestError
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.types import Interaction, Pooling
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, FrameType

from flexemr.routing.combine import Accumulator
from flexemr.validation import validate_request as validate

SPEC = ModelSpec(4, (8, 4), (8, 1), Interaction.DOT,
                 (TableSpec("a", 11, 4, Pooling.SUM), TableSpec("b", 7, 4, Pooling.MAX)))


def _decode(names, values, lengths, dense=None):
    frame = codec.encode_client_request(1, names, lengths, values, len(lengths[0]), dense)
    blob = b"".join(bytes(memoryview(b).cast("B")) for b in frame)
    ftype = FrameType.PREDICT if dense is not None else FrameType.CLIENT_LOOKUP
    return codec.decode_client_request(memoryview(blob)[HEADER_SIZE:], ftype)


def test_valid_request_maps_names_to_table_indices():
    req = _decode(["b"], [np.array([6, 0])], [np.array([1, 1], np.int32)])
    out = validate(SPEC, req, predict=False)
    assert list(out) == [1]


@pytest.mark.parametrize("names, values, match", [
    (["zz"], [np.array([1])], "unknown table 'zz'"),
    (["a"], [np.array([11])], "id 11 is past the end of table 'a' \\(11 rows\\)"),
    (["a"], [np.array([-3])], "id -3 is negative"),
    (["a", "a"], [np.array([1]), np.array([1])], "appears twice"),
])
def test_bad_requests_name_the_field(names, values, match):
    req = _decode(names, values, [np.array([1], np.int32)] * len(names))
    with pytest.raises(RequestError, match=match):
        validate(SPEC, req, predict=False)


def test_predict_needs_every_table_and_the_right_dense_width():
    req = _decode(["a"], [np.array([1])], [np.array([1], np.int32)], dense=np.zeros((1, 4), np.float32))
    with pytest.raises(RequestError, match="missing 'b'"):
        validate(SPEC, req, predict=True)
    req = _decode(["a", "b"], [np.array([1]), np.array([1])], [np.array([1], np.int32)] * 2,
                  dense=np.zeros((1, 5), np.float32))
    with pytest.raises(RequestError, match="dense: has 5 features per sample, the model expects 4"):
        validate(SPEC, req, predict=True)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_accumulator_equals_pooling_whole_bags(data):
    """Partials arriving in any split give the pooled result of the whole bag."""
    pooling = data.draw(st.sampled_from(list(Pooling)))
    B = data.draw(st.integers(1, 6))
    nparts = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    counts = rng.integers(0, 3, size=(nparts, B))
    rows = [rng.standard_normal((int(c.sum()), 3)).astype(np.float32) for c in counts]
    total = counts.sum(axis=0).astype(np.int32)
    acc = Accumulator(pooling, B, 3, total)
    whole = [[] for _ in range(B)]
    for part, cnt in zip(rows, counts):
        off = np.r_[0, np.cumsum(cnt)]
        partial = np.zeros((B, 3), np.float32)
        for b in range(B):
            bag = part[off[b]:off[b + 1]]
            whole[b].extend(bag)
            if len(bag):
                partial[b] = bag.max(0) if pooling is Pooling.MAX else bag.sum(0)
        acc.add(partial, cnt)
    got = acc.result()
    for b in range(B):
        bag = np.array(whole[b]).reshape(-1, 3)
        if not len(bag):
            want = np.zeros(3)
        elif pooling is Pooling.MAX:
            want = bag.max(0)
        elif pooling is Pooling.MEAN:
            want = bag.mean(0)
        else:
            want = bag.sum(0)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
