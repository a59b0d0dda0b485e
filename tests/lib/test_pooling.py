"""Pooling kernels against the float64 reference; the monolithic model against the numpy DLRM."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.errors import RequestError
from flexemr.model.dense import reference_forward_numpy
from flexemr.model.presets import init_model_dir
from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables
from flexemr.pooling import pool_reference, pool_torch
from flexemr.reqgen import RequestGenerator
from flexemr.types import Pooling


def _kjt(bags: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([i for b in bags for i in b], dtype=np.int64)
    lengths = np.array([len(b) for b in bags], dtype=np.int32)
    return values, lengths


def test_hand_computed_bags_every_mode():
    # All-negative rows: a max that starts from zero instead of -inf would be caught.
    table = -np.array([[1, 10], [2, 20], [3, 30]], dtype=np.float32)
    values, lengths = _kjt([[0, 1], [], [2, 2, 2], [1], []])
    want = {
        Pooling.SUM: [[-3, -30], [0, 0], [-9, -90], [-2, -20], [0, 0]],
        Pooling.MEAN: [[-1.5, -15], [0, 0], [-3, -30], [-2, -20], [0, 0]],
        Pooling.MAX: [[-1, -10], [0, 0], [-3, -30], [-2, -20], [0, 0]],
    }
    for mode, rows in want.items():
        for fn in (pool_reference, pool_torch):
            got = fn(table, values, lengths, mode)
            assert got.dtype == np.float32 and got.shape == (5, 2)
            np.testing.assert_array_equal(got, np.array(rows, np.float32), err_msg=f"{fn.__name__} {mode.label}")


def test_all_bags_empty_and_zero_bags():
    table = np.ones((4, 3), np.float32)
    for fn in (pool_reference, pool_torch):
        for mode in Pooling:
            assert not fn(table, *_kjt([[], [], []]), mode).any()
            assert fn(table, *_kjt([]), mode).shape == (0, 3)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    rows=st.integers(1, 40),
    dim=st.integers(1, 9),
    mode=st.sampled_from(list(Pooling)),
)
def test_pool_torch_equals_reference(data, rows, dim, mode):
    """Random bags incl. empty ones, single ids and repeated ids."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    table = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    bag = st.one_of(
        st.just([]),
        st.lists(st.integers(0, rows - 1), min_size=1, max_size=1),
        st.integers(0, rows - 1).flatmap(lambda i: st.lists(st.just(i), min_size=2, max_size=6)),
        st.lists(st.integers(0, rows - 1), min_size=0, max_size=30),
    )
    bags = data.draw(st.lists(bag, min_size=0, max_size=20))
    values, lengths = _kjt(bags)
    np.testing.assert_allclose(
        pool_torch(table, values, lengths, mode), pool_reference(table, values, lengths, mode), rtol=1e-5, atol=1e-5
    )


def test_pool_torch_reads_a_read_only_map_without_copy_or_warning(tmp_path):
    table = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    np.save(tmp_path / "t.npy", table)
    mm = np.load(tmp_path / "t.npy", mmap_mode="r")
    values, lengths = _kjt([[1, 2, 299], [], [7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "non-writable array" warning must not escape
        got = pool_torch(mm, values, lengths, Pooling.SUM)
    np.testing.assert_allclose(got, pool_reference(table, values, lengths, Pooling.SUM), rtol=1e-6)


@pytest.mark.parametrize("fn", [pool_reference, pool_torch])
@pytest.mark.parametrize(
    "values, lengths, match",
    [
        ([0, -1], [2], "id -1 is outside"),      # numpy would silently wrap to the last row
        ([0, 10], [2], "id 10 is outside"),
        ([0, 1], [1], "sum to 1 but there are 2 values"),
        ([0], [2, -1], "negative bag length"),
    ],
)
def test_bad_bags_are_refused(fn, values, lengths, match):
    table = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match=match):
        fn(table, np.array(values), np.array(lengths, np.int32), Pooling.SUM)


# --------------------------------------------------------------------------- monolithic model


@pytest.fixture(scope="module")
def tiny_cat(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny-cat"
    init_model_dir(out, "tiny-cat", seed=11)
    return out


def _numpy_predict(model_dir, dense, sparse):
    spec = load_spec(model_dir)
    tables = open_tables(model_dir, spec)
    state = {k: v.numpy() for k, v in torch.load(model_dir / "dense.pt", weights_only=True).items()}
    pooled = [pool_reference(tables[t.name], *sparse[t.name], t.pooling) for t in spec.tables]
    return reference_forward_numpy(state, spec, dense, pooled)


@pytest.mark.parametrize("which", ["tiny", "tiny-cat"])
def test_monolithic_predict_matches_numpy_reference(which, tiny_model, tiny_cat):
    from flexemr.monolithic import MonolithicModel

    model_dir = tiny_model if which == "tiny" else tiny_cat
    m = MonolithicModel(model_dir)
    gen = RequestGenerator(m.spec, ids_per_bag=6, seed=4, empty_bag_prob=0.1)
    for b in (1, 17, 256):
        dense, sparse = gen.batch(b)
        got = m.predict(dense, sparse)
        assert got.shape == (b,) and got.dtype == np.float32
        np.testing.assert_allclose(got, _numpy_predict(model_dir, dense, sparse), rtol=1e-5, atol=1e-6)


def test_monolithic_lookup_and_request_errors(tiny_model):
    from flexemr.monolithic import MonolithicModel

    m = MonolithicModel(tiny_model)
    spec = m.spec
    t3, t1 = spec.tables[3], spec.tables[1]
    v, ln = _kjt([[0, t3.rows - 1], [], [5]])
    v1, ln1 = _kjt([[0, t1.rows - 1], [], [5]])
    pooled = m.lookup({t3.name: (v, ln), t1.name: (v1, ln1)})
    assert list(pooled) == [t1.name, t3.name], "model table order, only the tables asked for"
    np.testing.assert_allclose(pooled[t3.name], pool_reference(m.tables[t3.name], v, ln, t3.pooling), rtol=1e-6)
    assert not pooled[t1.name][1].any()

    dense, sparse = RequestGenerator(spec, 4, seed=0).batch(3)
    with pytest.raises(RequestError, match="unknown table"):
        m.lookup({"nope": (v, ln)})
    with pytest.raises(RequestError, match=r"dense: shape \(3, 12\)"):
        m.predict(dense[:, :12], sparse)
    with pytest.raises(RequestError, match=f"missing tables \\['{spec.tables[0].name}'\\]"):
        m.predict(dense, {k: s for k, s in sparse.items() if k != spec.tables[0].name})
    bad = dict(sparse)
    bad[t1.name] = (np.array([t1.rows]), np.array([1, 0, 0], np.int32))
    with pytest.raises(RequestError, match=f"sparse\\['{t1.name}'\\]: id {t1.rows} is outside"):
        m.predict(dense, bad)
    bad[t1.name] = (np.array([1]), np.array([1, 0], np.int32))
    with pytest.raises(RequestError, match="2 bags, expected batch size 3"):
        m.predict(dense, bad)
