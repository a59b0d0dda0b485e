"""flexemr.validation: what a caller sees when a request is refused, and that every entry point agrees."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.errors import RequestError
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.types import Interaction, Pooling
from flexemr.validation import (
    check_dense_finite,
    check_limits,
    request_from_arrays,
    validate_request,
)
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, FrameType

SPEC = ModelSpec(4, (8, 4), (8, 1), Interaction.DOT,
                 (TableSpec("a", 11, 4, Pooling.SUM), TableSpec("b", 7, 4, Pooling.MAX)))


def _decoded(dense, sparse):
    """What the daemon's inference process decodes from the client's frame for the same arrays."""
    names = list(sparse)
    values = [np.asarray(sparse[n][0], np.int64) for n in names]
    lengths = [np.asarray(sparse[n][1], np.int32) for n in names]
    frame = codec.encode_client_request(1, names, lengths, values, len(lengths[0]),
                                        None if dense is None else np.asarray(dense, np.float32))
    blob = b"".join(bytes(memoryview(b).cast("B")) for b in frame)
    ftype = FrameType.PREDICT if dense is not None else FrameType.CLIENT_LOOKUP
    return codec.decode_client_request(memoryview(blob)[HEADER_SIZE:], ftype)


def _good(batch=3):
    dense = np.zeros((batch, 4), np.float32)
    sparse = {"a": (np.arange(batch) % 11, np.ones(batch, np.int32)),
              "b": (np.arange(2 * batch) % 7, np.full(batch, 2, np.int32))}
    return dense, sparse


def test_valid_predict_maps_tables_to_model_indices():
    dense, sparse = _good()
    out = validate_request(SPEC, request_from_arrays(dense, sparse), predict=True)
    assert sorted(out) == [0, 1]
    np.testing.assert_array_equal(out[1][1], [2, 2, 2])


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_nonfinite_dense_feature_is_refused_naming_sample_and_feature(value, word):
    dense, sparse = _good(5)
    dense[3, 2] = value
    with pytest.raises(RequestError, match=rf"^dense: sample 3 feature 2 is {word}$"):
        validate_request(SPEC, request_from_arrays(dense, sparse), predict=True)


def test_nonfinite_dense_is_served_when_allowed():
    dense, sparse = _good()
    dense[0, 0] = np.nan
    out = validate_request(SPEC, request_from_arrays(dense, sparse), predict=True, allow_nonfinite=True)
    assert sorted(out) == [0, 1]


@settings(max_examples=80, deadline=None)
@given(batch=st.integers(1, 40), features=st.integers(1, 9), data=st.data())
def test_the_first_nonfinite_value_is_the_one_named(batch, features, data):
    dense = np.zeros((batch, features), np.float32)
    bad = data.draw(st.lists(st.tuples(st.integers(0, batch - 1), st.integers(0, features - 1)),
                             min_size=1, max_size=5))
    for s, f in bad:
        dense[s, f] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    s, f = min(bad)  # row-major order: the first sample, then the first feature in it
    with pytest.raises(RequestError, match=rf"^dense: sample {s} feature {f} is "):
        check_dense_finite(dense)


def test_request_over_max_batch_names_the_batch():
    dense, sparse = _good(5)
    req = request_from_arrays(dense, sparse)
    with pytest.raises(RequestError, match=r"^batch: 5 samples in one request, more than max_batch \(4\)"):
        validate_request(SPEC, req, predict=True, max_batch=4)
    validate_request(SPEC, req, predict=True, max_batch=5)


def test_request_over_max_ids_names_the_biggest_table():
    dense, sparse = _good(3)  # 3 ids in a, 6 in b
    req = request_from_arrays(dense, sparse)
    with pytest.raises(RequestError, match=r"^sparse: 9 ids in one request, more than max_ids \(8\); "
                                           r"the most in sparse\['b'\] \(6\)"):
        check_limits(req, max_ids=8)
    check_limits(req, max_batch=3, max_ids=9)


@pytest.mark.parametrize("sparse, dense, match", [
    ({"zz": ([1], [1])}, None, r"^sparse: unknown table 'zz' \(the model has a, b\)"),
    ({"a": ([11], [1])}, None, r"^sparse\['a'\] values: id 11 is past the end of table 'a' \(11 rows\)"),
    ({"a": ([-3], [1])}, None, r"^sparse\['a'\] values: id -3 is negative"),
    ({"a": ([1], [1])}, np.zeros((1, 4), np.float32), r"^sparse: predict needs every table; missing 'b'"),
    ({"a": ([1], [1]), "b": ([1], [1])}, np.zeros((1, 3), np.float32), r"^dense: has 3 features per sample"),
])
def test_in_process_and_daemon_refuse_with_the_same_message(sparse, dense, match):
    """monolithic (request_from_arrays) and the daemon (decoded frame) get the same answer."""
    sparse = {k: (np.asarray(v, np.int64), np.asarray(ln, np.int32)) for k, (v, ln) in sparse.items()}
    predict = dense is not None
    messages = []
    for req in (request_from_arrays(dense, sparse), _decoded(dense, sparse)):
        with pytest.raises(RequestError, match=match) as e:
            validate_request(SPEC, req, predict=predict)
        messages.append(str(e.value))
    assert messages[0] == messages[1]


def test_encoding_checks_name_the_field():
    with pytest.raises(RequestError, match=r"^dense: must be 2-D"):
        request_from_arrays(np.zeros(4, np.float32), {"a": ([1], [1])})
    with pytest.raises(RequestError, match=r"^sparse\['a'\] lengths: has 1 bags but the batch has 2"):
        request_from_arrays(np.zeros((2, 4), np.float32), {"a": (np.array([1]), np.array([1]))})


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_arrays_and_decoded_frame_validate_identically(data):
    """Any valid request: the in-process request equals what the daemon decodes, table by table."""
    batch = data.draw(st.integers(0, 6))
    names = data.draw(st.permutations(["a", "b"]))[:data.draw(st.integers(1, 2))]
    sparse = {}
    for n in names:
        rows = SPEC.table(n).rows
        lengths = np.array(data.draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch)), np.int32)
        values = np.array(data.draw(st.lists(st.integers(0, rows - 1), min_size=int(lengths.sum()),
                                             max_size=int(lengths.sum()))), np.int64)
        sparse[n] = (values, lengths)
    predict = len(names) == 2 and data.draw(st.booleans())
    dense = (np.array(data.draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=4 * batch,
                                         max_size=4 * batch)), np.float32).reshape(batch, 4)
             if predict else None)
    a = validate_request(SPEC, request_from_arrays(dense, sparse), predict=predict)
    b = validate_request(SPEC, _decoded(dense, sparse), predict=predict)
    assert sorted(a) == sorted(b) == sorted(SPEC.table_names.index(n) for n in names)
    for t in a:
        np.testing.assert_array_equal(a[t][0], b[t][0])
        np.testing.assert_array_equal(a[t][1], b[t][1])
