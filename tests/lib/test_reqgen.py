"""The request generator: well-formed KJT batches with Zipf skew, scattered hot rows, drift."""

from __future__ import annotations

import time

import numpy as np
import pytest

from flexemr.model.presets import PRESETS
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.reqgen import RequestGenerator, ZipfSampler, load_requests, requests_meta, save_requests
from flexemr.types import Interaction


def _spec(rows: int = 100_000, n: int = 1, names=None) -> ModelSpec:
    names = names or [f"t{i}" for i in range(n)]
    return ModelSpec(dense_features=5, bottom_mlp=(8,), top_mlp=(1,), interaction=Interaction.CAT,
                     tables=tuple(TableSpec(nm, rows, 4) for nm in names))


def _ids(gen: RequestGenerator, batches: int, b: int, table: str = "t0") -> np.ndarray:
    return np.concatenate([gen.batch(b)[1][table][0] for _ in range(batches)])


def test_batches_are_well_formed_kjt():
    spec = PRESETS["tiny"].spec
    gen = RequestGenerator(spec, ids_per_bag={"t0": 3, "t1": 10, "t2": 1, "t3": 40}, seed=1)
    for b in (1, 7, 500):
        dense, sparse = gen.batch(b)
        assert dense.shape == (b, 13) and dense.dtype == np.float32
        assert list(sparse) == list(spec.table_names)
        for t in spec.tables:
            values, lengths = sparse[t.name]
            assert values.dtype == np.int64 and lengths.dtype == np.int32
            assert len(lengths) == b and int(lengths.sum()) == len(values)
            assert (lengths >= 0).all()
            if len(values):
                assert values.min() >= 0 and values.max() < t.rows
    _, sparse = gen.batch(2000)
    assert 35 < sparse["t3"][1].mean() < 45 and sparse["t0"][1].mean() < 4   # per-table means honoured


def test_empty_bags_occur_and_fixed_lengths_are_exact():
    gen = RequestGenerator(_spec(), ids_per_bag=20, seed=0, empty_bag_prob=0.05)
    lengths = gen.batch(4000)[1]["t0"][1]
    assert 120 < (lengths == 0).sum() < 300                              # ~5% of 4000
    gen = RequestGenerator(_spec(), ids_per_bag=20, seed=0, empty_bag_prob=0.0, length_dist="fixed")
    assert (gen.batch(100)[1]["t0"][1] == 20).all()


def test_zipf_skew_matches_the_exact_law():
    """The top 1% of rows take the share of accesses the discrete Zipf law predicts."""
    rows = 100_000
    gen = RequestGenerator(_spec(rows), ids_per_bag=50, zipf_exponent=1.05, seed=3, empty_bag_prob=0)
    ids = _ids(gen, 10, 2000)
    counts = np.sort(np.bincount(ids, minlength=rows))[::-1]
    share = counts[: rows // 100].sum() / len(ids)
    exact = ZipfSampler(rows, 1.05).pmf(np.arange(rows // 100)).sum()
    assert exact > 0.6                       # strongly skewed: what makes a cache pay
    assert share == pytest.approx(exact, abs=0.01)
    # and uniform traffic (exponent 0) is not skewed
    flat = _ids(RequestGenerator(_spec(rows), ids_per_bag=50, zipf_exponent=0.0, seed=3), 10, 2000)
    top = np.sort(np.bincount(flat, minlength=rows))[::-1][: rows // 100].sum() / len(flat)
    assert top < 0.03


def test_hot_rows_are_scattered_over_the_table_not_clustered_at_low_ids():
    rows = 100_000
    ids = _ids(RequestGenerator(_spec(rows), ids_per_bag=50, seed=5), 4, 2000)
    hot = np.argsort(np.bincount(ids, minlength=rows))[::-1][:200]
    # Range shards of a quarter of the table each: every one holds a fair part of the hot rows.
    per_quarter = np.bincount(hot * 4 // rows, minlength=4)
    assert per_quarter.min() >= 25, per_quarter
    assert set(hot[:10]) == set(RequestGenerator(_spec(rows), ids_per_bag=50, seed=5).hot_ids("t0", 10))


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = (RequestGenerator(_spec(), 10, seed=s) for s in (1, 1, 2))
    da, sa = a.batch(64)
    db, sb = b.batch(64)
    dc, sc = c.batch(64)
    assert np.array_equal(da, db) and np.array_equal(sa["t0"][0], sb["t0"][0])
    assert not np.array_equal(sa["t0"][0][:20], sc["t0"][0][:20])


def test_drift_changes_the_hot_set():
    rows = 20_000

    def top(ids, k=100):
        return set(np.argsort(np.bincount(ids, minlength=rows))[::-1][:k])

    steady = RequestGenerator(_spec(rows), 40, seed=9)
    before, after = _ids(steady, 5, 2000), _ids(steady, 5, 2000)
    assert len(top(before) & top(after)) > 70          # without drift the hot set stays

    drifting = RequestGenerator(_spec(rows), 40, seed=9, drift_every=1, drift_fraction=0.3)
    before = _ids(drifting, 1, 10_000)
    for _ in range(8):
        drifting.batch(1)
    after = _ids(drifting, 1, 10_000)
    assert len(top(before) & top(after)) < 30          # ~0.7^9 of the hot ids are still hot
    assert len(top(after)) == 100 and after.max() < rows


def test_save_load_round_trip(tmp_path):
    spec = _spec(names=["a.b", "c"])                    # dots in a name must not confuse the reader
    gen = RequestGenerator(spec, ids_per_bag=5, seed=2, empty_bag_prob=0.3)
    batches = [gen.batch(b) for b in (1, 9, 33)]
    path = save_requests(tmp_path / "reqs", batches, meta={"preset": "custom", "zipf": 1.05})
    assert path.name == "reqs", "no .npz suffix appended behind the caller's back"
    got = load_requests(path)
    assert len(got) == 3
    for (d0, s0), (d1, s1) in zip(batches, got):
        assert np.array_equal(d0, d1) and d1.dtype == np.float32
        assert list(s1) == ["a.b", "c"]
        for k in s0:
            assert np.array_equal(s0[k][0], s1[k][0]) and s1[k][0].dtype == np.int64
            assert np.array_equal(s0[k][1], s1[k][1]) and s1[k][1].dtype == np.int32
    meta = requests_meta(path)
    assert meta["preset"] == "custom" and meta["version"] == 1
    with np.load(path, allow_pickle=False) as z:     # the documented key names
        assert {"meta", "b0.dense", "b2.a.b.values", "b2.a.b.lengths", "b1.c.values"} <= set(z.files)


def test_load_refuses_foreign_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a flexemr request file"):
        load_requests(tmp_path / "x.npz")


def test_big_tables_are_fast():
    """rmc1 shape: 4M rows, batch 4096 x 80 ids: no per-id Python anywhere."""
    spec = _spec(4_000_000)
    t0 = time.perf_counter()
    gen = RequestGenerator(spec, ids_per_bag=80, seed=0)
    dense, sparse = gen.batch(4096)
    elapsed = time.perf_counter() - t0
    assert len(sparse["t0"][0]) > 300_000
    assert elapsed < 3.0, f"{elapsed:.2f} s"
