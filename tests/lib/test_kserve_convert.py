"""flexemr.kserve.convert: HPS CSR and KJT conventions, tensor decoding, outputs, metadata."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.errors import RequestError
from flexemr.kserve import convert
from flexemr.kserve.convert import csr_to_kjt, kjt_to_csr, to_request
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.types import Interaction, Pooling

SPEC = ModelSpec(dense_features=3, bottom_mlp=(4,), top_mlp=(2, 1), interaction=Interaction.DOT,
                 tables=(TableSpec("a", 100, 4), TableSpec("b", 50, 4, Pooling.MEAN), TableSpec("c", 10, 4)))
NAMES = SPEC.table_names


def _eq_sparse(x, y) -> None:
    assert list(x) == list(y)
    for t in x:
        np.testing.assert_array_equal(x[t][0], y[t][0])
        np.testing.assert_array_equal(x[t][1], y[t][1])
        assert x[t][0].dtype == np.int64 and x[t][1].dtype == np.int32


def test_hugectr_sample_one_key_per_slot():
    # HugeCTR's criteo2predict.py with batch 1: ROWINDEX = 0..S, one key per slot
    keys = np.array([58, 17, 5], dtype=np.int64)
    sparse = csr_to_kjt(NAMES, keys, np.arange(4, dtype=np.int32))
    _eq_sparse(sparse, {"a": (np.array([58]), np.array([1], np.int32)),
                        "b": (np.array([17]), np.array([1], np.int32)),
                        "c": (np.array([5]), np.array([1], np.int32))})


def test_csr_is_sample_major_with_empty_bags():
    # sample 0: a=[1,2] b=[] c=[3]; sample 1: a=[4] b=[5,6,7] c=[]
    keys = np.array([1, 2, 3, 4, 5, 6, 7])
    row_index = np.array([0, 2, 2, 3, 4, 7, 7], dtype=np.int32)
    sparse = csr_to_kjt(NAMES, keys, row_index)
    _eq_sparse(sparse, {"a": (np.array([1, 2, 4]), np.array([2, 1], np.int32)),
                        "b": (np.array([5, 6, 7]), np.array([0, 3], np.int32)),
                        "c": (np.array([3]), np.array([1, 0], np.int32))})
    k2, r2 = kjt_to_csr(NAMES, sparse)
    np.testing.assert_array_equal(k2, keys)
    np.testing.assert_array_equal(r2, row_index)
    assert r2.dtype == np.int32


@st.composite
def kjt_batches(draw):
    batch = draw(st.integers(1, 12))
    out = {}
    for name in NAMES:
        lengths = np.array(draw(st.lists(st.integers(0, 5), min_size=batch, max_size=batch)), dtype=np.int32)
        values = np.array(draw(st.lists(st.integers(0, 2**40), min_size=int(lengths.sum()),
                                        max_size=int(lengths.sum()))), dtype=np.int64)
        out[name] = (values, lengths)
    return out


@settings(max_examples=150, deadline=None)
@given(kjt_batches())
def test_kjt_csr_round_trip(sparse):
    keys, row_index = kjt_to_csr(NAMES, sparse)
    batch = len(sparse["a"][1])
    assert row_index.shape == (batch * len(NAMES) + 1,)
    _eq_sparse(csr_to_kjt(NAMES, keys, row_index), sparse)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 10).flatmap(lambda b: st.lists(st.integers(0, 4), min_size=b * 3, max_size=b * 3)))
def test_csr_kjt_round_trip(bag_sizes):
    row_index = np.concatenate([[0], np.cumsum(bag_sizes)]).astype(np.int32)
    keys = np.arange(row_index[-1], dtype=np.int64) * 7 + 1
    sparse = csr_to_kjt(NAMES, keys, row_index)
    # bag (b, s) of the CSR is bag b of table s
    counts = np.asarray(bag_sizes).reshape(-1, 3)
    for s, t in enumerate(NAMES):
        np.testing.assert_array_equal(sparse[t][1], counts[:, s])
    k2, r2 = kjt_to_csr(NAMES, sparse)
    np.testing.assert_array_equal(k2, keys)
    np.testing.assert_array_equal(r2, row_index)


@pytest.mark.parametrize("keys,row_index,match", [
    ([1, 2], [0, 1, 2], "ROWINDEX.*3 slots"),                  # not B*S+1 offsets
    ([1, 2, 3], [1, 1, 2, 3], "ROWINDEX: must start at 0"),
    ([1, 2, 3], [0, 2, 1, 3], r"ROWINDEX: offsets must not decrease \(ROWINDEX\[2\]"),
    ([1, 2, 3], [0, 1, 2, 2], "last offset is 2 but CATCOLUMN has 3 keys"),
    ([1.5, 2, 3], [0, 1, 2, 3], "CATCOLUMN: keys must be integers"),
    (np.array([2**63, 1, 2], np.uint64), [0, 1, 2, 3], "CATCOLUMN: a key does not fit int64"),
    ([1, 2, 3], [0.0, 1, 2, 3], "ROWINDEX: row offsets must be integers"),
])
def test_bad_csr_names_the_field(keys, row_index, match):
    with pytest.raises(RequestError, match=match):
        csr_to_kjt(NAMES, np.asarray(keys), np.asarray(row_index))


def _hps(batch=2):
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 3, batch * 3)
    row_index = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    keys = rng.integers(0, 10, row_index[-1]).astype(np.int64)
    return {"DES": rng.random((1, batch * 3), dtype=np.float32), "CATCOLUMN": keys, "ROWINDEX": row_index}


def test_hps_request_flat_des_is_reshaped():
    inputs = _hps(2)
    dense, sparse = to_request(SPEC, inputs, predict=True)
    assert dense.shape == (2, 3) and dense.dtype == np.float32
    np.testing.assert_array_equal(dense.reshape(-1), inputs["DES"].reshape(-1))
    assert list(sparse) == list(NAMES)


def test_hps_uint32_keys_accepted():
    inputs = _hps(2)
    inputs["CATCOLUMN"] = inputs["CATCOLUMN"].astype(np.uint32)
    _, sparse = to_request(SPEC, inputs, predict=False)
    assert sparse["a"][0].dtype == np.int64


def test_kjt_request_in_model_table_order_and_subset_for_lookup():
    inputs = {"c__lengths": np.array([1, 0], np.int32), "c__values": np.array([9], np.int64),
              "a__values": np.array([1, 2], np.int64), "a__lengths": np.array([0, 2], np.int32)}
    dense, sparse = to_request(SPEC, inputs, predict=False)
    assert dense is None and list(sparse) == ["a", "c"]


@pytest.mark.parametrize("mutate,predict,match", [
    (lambda i: i.pop("DES"), True, "input 'DES': required by model 'flexemr'"),
    (lambda i: i.update(DES=np.zeros(5, np.float32)), True, r"input 'DES': shape \[5\] holds 5 values"),
    (lambda i: i.update(DES=np.zeros(6, np.float64)), True, "input 'DES': datatype must be FP32, got FP64"),
    (lambda i: i.pop("ROWINDEX"), True, "input 'ROWINDEX': required with CATCOLUMN"),
    (lambda i: i.update(EXTRA=np.zeros(1)), True, "unknown input 'EXTRA'"),
    (lambda i: i.update(a__values=np.zeros(1, np.int64)), True, "mix the HPS convention"),
    (lambda i: i.update(ROWINDEX=i["ROWINDEX"].astype(np.float32)), True, "input 'ROWINDEX': datatype must be"),
    (lambda i: i.update(CATCOLUMN=i["CATCOLUMN"].astype(np.float32)), True, "input 'CATCOLUMN': datatype must"),
])
def test_bad_hps_request_names_the_input(mutate, predict, match):
    inputs = _hps(2)
    mutate(inputs)
    with pytest.raises(RequestError, match=match):
        to_request(SPEC, inputs, predict)


@pytest.mark.parametrize("inputs,match", [
    ({"a__values": np.array([1], np.int64)}, "input 'a__lengths': required with 'a__values'"),
    ({"z__values": np.array([1], np.int64), "z__lengths": np.array([1], np.int32)}, "unknown table 'z'"),
    ({"a__values": np.array([1], np.int64), "a__lengths": np.array([2], np.int32)},
     "input 'a__lengths': lengths sum to 2 but 'a__values' has 1 values"),
    ({"a__values": np.array([1], np.int64), "a__lengths": np.array([1], np.int32),
      "b__values": np.array([1], np.int64), "b__lengths": np.array([1, 0], np.int32)},
     "input 'b__lengths': has 2 bags but 'a__lengths' has 1"),
    ({"a__values": np.array([1.0]), "a__lengths": np.array([1], np.int32)}, "input 'a__values': datatype"),
    ({"a__values": np.array([1], np.int64), "a__lengths": np.array([-1, 2], np.int32)}, "must be >= 0"),
    ({"DES": np.zeros(3, np.float32)}, "no sparse inputs"),
    ({"a__values": np.zeros(0, np.int64), "a__lengths": np.zeros(0, np.int32)}, "the batch is empty"),
])
def test_bad_kjt_request_names_the_input(inputs, match):
    with pytest.raises(RequestError, match=match):
        to_request(SPEC, inputs, predict=False)


def test_decode_raw_and_list():
    arr = np.arange(6, dtype=np.int64)
    np.testing.assert_array_equal(convert.decode_raw("x", "INT64", [2, 3], arr.tobytes()), arr.reshape(2, 3))
    with pytest.raises(RequestError, match=r"input 'x': 40 bytes of data, but shape \[2, 3\] of INT64 needs 48"):
        convert.decode_raw("x", "INT64", [2, 3], arr.tobytes()[:40])
    with pytest.raises(RequestError, match="input 'x': datatype 'BYTES' is not supported"):
        convert.decode_raw("x", "BYTES", [1], b"a")
    with pytest.raises(RequestError, match="input 'x': shape must be a list of integers"):
        convert.decode_raw("x", "INT64", ["a"], b"")
    np.testing.assert_array_equal(convert.decode_list("x", "INT32", [2, 2], [[1, 2], [3, 4]]),
                                  np.array([[1, 2], [3, 4]], np.int32))
    with pytest.raises(RequestError, match="input 'x': data is not a list of INT64"):
        convert.decode_list("x", "INT64", [2], [1.5, 2])
    with pytest.raises(RequestError, match="input 'x': 3 values in data, but shape"):
        convert.decode_list("x", "FP32", [2], [1, 2, 3])
    with pytest.raises(RequestError, match="does not fit INT32"):
        convert.decode_list("x", "INT32", [1], [2**40])


def test_outputs_and_metadata():
    out = convert.outputs_of(SPEC, "flexemr", np.array([0.5, 0.25], np.float32))
    assert [(t.name, t.datatype, t.shape) for t in out] == [("OUTPUT0", "FP32", [2])]
    pooled = {t: np.full((2, 4), i, np.float32) for i, t in enumerate(NAMES)}
    out = convert.outputs_of(SPEC, "flexemr_lookup", pooled, hps=True)
    assert [t.name for t in out] == ["OUTPUT0", "a__pooled", "b__pooled", "c__pooled"]
    assert out[0].shape == [2, 12]
    with pytest.raises(RequestError, match="requested output 'nope'"):
        convert.outputs_of(SPEC, "flexemr", np.zeros(2, np.float32), ["nope"])
    md = convert.model_metadata(SPEC, "flexemr")
    assert md["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1]}]
    assert {"name": "b__lengths", "datatype": "INT32", "shape": [-1]} in md["inputs"]
    with pytest.raises(convert.UnknownModel, match="unknown model 'dcn'"):
        convert.check_model("dcn")
