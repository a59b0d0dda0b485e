"""RowCache: cache-on answers equal cache-off answers, LRU fidelity against an offline simulation, resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.cache import RowCache, simulate_lru, trace_keys
from flexemr.cache.policy import CachePolicy
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.pooling import pool_reference
from flexemr.reqgen import RequestGenerator
from flexemr.types import Interaction, Pooling

# Mixed dims and every pooling mode; t0 and t2 share the dim-4 pool.
TABLES = (
    TableSpec("t0", 50, 4, Pooling.SUM),
    TableSpec("t1", 37, 8, Pooling.MEAN),
    TableSpec("t2", 61, 4, Pooling.MAX),
)


def _int_tables(seed: int = 0) -> list[np.ndarray]:
    # Small integers: every float32 sum is exact in any order, so hierarchical
    # pooling must agree bit for bit and any difference is a logic error.
    rng = np.random.default_rng(seed)
    return [rng.integers(-16, 17, size=(t.rows, t.dim)).astype(np.float32) for t in TABLES]


def _kjt(bags: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([i for b in bags for i in b], dtype=np.int64), np.array([len(b) for b in bags], dtype=np.int32))


def _combine(pooling: Pooling, hit: np.ndarray, hit_n: np.ndarray, miss: np.ndarray, miss_n: np.ndarray) -> np.ndarray:
    """The ranker's global pooling of two partials (the integrator's combiner, restated independently)."""
    if pooling is Pooling.MAX:
        out = np.zeros_like(hit)
        h, m = (hit_n > 0)[:, None], (miss_n > 0)[:, None]
        out = np.where(h & m, np.maximum(hit, miss), np.where(h, hit, np.where(m, miss, out)))
        return out.astype(np.float32)
    total = (hit + miss).astype(np.float32)
    if pooling is Pooling.MEAN:
        total /= np.maximum(hit_n + miss_n, 1).astype(np.float32)[:, None]
    return total


def _served(cache: RowCache, tables: list[np.ndarray], t: int, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """What the ranker answers with the cache on: local hit pool + the servers' pool of the misses."""
    spec = TABLES[t]
    s = cache.split(t, values, lengths)
    assert (s.hit_counts + s.miss_lengths == lengths).all()
    assert s.hit_mask.sum() == s.hit_counts.sum() == len(values) - len(s.miss_values)
    assert (s.miss_values == values[~s.hit_mask]).all()
    # Servers send sums for mean bags (the ranker divides by the total count).
    remote_mode = Pooling.SUM if spec.pooling is Pooling.MEAN else spec.pooling
    miss = pool_reference(tables[t], s.miss_values, s.miss_lengths, remote_mode)
    hit = s.hit_pooled(spec.pooling).cpu().numpy()
    assert hit.shape == (len(lengths), spec.dim) and hit.dtype == np.float32
    assert (hit[s.hit_counts == 0] == 0).all()
    return _combine(spec.pooling, hit, s.hit_counts, miss, s.miss_lengths)


bags_st = st.lists(st.lists(st.integers(0, 36), max_size=7), max_size=12)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bags=bags_st, cached=st.sets(st.integers(0, 36)), cap_rows=st.integers(0, 40), t=st.integers(0, 2))
def test_cache_on_equals_cache_off_exactly(bags, cached, cap_rows, t):
    tables = _int_tables()
    cache = RowCache(TABLES, capacity_bytes=cap_rows * 8 * 4, admission="lru")
    rows = np.array(sorted(cached), dtype=np.int64)
    cache.fill(t, rows, tables[t][rows])   # may evict (small capacity) or store nothing (capacity 0)
    values, lengths = _kjt(bags)
    want = pool_reference(tables[t], values, lengths, TABLES[t].pooling)
    got = _served(cache, tables, t, values, lengths)
    np.testing.assert_array_equal(got, want)
    # Served a second time after the misses were filled: still the same answer.
    for tt, r in cache.candidates_for_fill(1000).items():
        cache.fill(tt, r, tables[tt][r])
    np.testing.assert_array_equal(_served(cache, tables, t, values, lengths), want)


@pytest.mark.parametrize("t", [0, 1, 2])
def test_all_hit_all_miss_empty_and_repeated(t):
    tables = _int_tables(1)
    spec = TABLES[t]
    cache = RowCache(TABLES, capacity_bytes=1 << 20)
    hot = np.array([1, 2, 3, 5, 8], dtype=np.int64)
    cache.fill(t, hot, tables[t][hot])
    cases = {
        "all hit, repeats": [[1, 1, 1], [2, 3, 5, 8, 8], [5]],
        "all miss": [[0, 4], [6], [7, 7, 7]],
        "mixed + empty": [[], [1, 4, 1, 6], [], [0], [8, 9, 8], []],
        "only empty": [[], [], []],
        "no bags": [],
    }
    for name, bags in cases.items():
        values, lengths = _kjt(bags)
        want = pool_reference(tables[t], values, lengths, spec.pooling)
        np.testing.assert_array_equal(_served(cache, tables, t, values, lengths), want, err_msg=name)
    s = cache.split(t, *_kjt(cases["all hit, repeats"]))
    assert s.hit_mask.all() and len(s.miss_values) == 0 and (s.miss_lengths == 0).all()
    s = cache.split(t, *_kjt(cases["all miss"]))
    assert not s.hit_mask.any() and (s.hit_counts == 0).all()


def test_random_floats_match_within_rounding():
    # Real rows: only the summation order differs, as with any hierarchical pooling.
    rng = np.random.default_rng(3)
    tables = [rng.standard_normal((t.rows, t.dim)).astype(np.float32) for t in TABLES]
    cache = RowCache(TABLES, capacity_bytes=30 * 8 * 4, admission="lru")
    for _ in range(20):
        for t, spec in enumerate(TABLES):
            lengths = rng.integers(0, 9, size=16).astype(np.int32)
            values = rng.integers(0, 37, size=int(lengths.sum())).astype(np.int64)
            want = pool_reference(tables[t], values, lengths, spec.pooling)
            got = _served(cache, tables, t, values, lengths)
            if spec.pooling is Pooling.MAX:
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for tt, r in cache.candidates_for_fill(64).items():
            cache.fill(tt, r, tables[tt][r])
    assert cache.stats()["hits"] > 0


def test_hit_pooled_other_mode_only_while_unchanged():
    tables = _int_tables()
    cache = RowCache(TABLES, capacity_bytes=1 << 16)
    cache.fill(0, np.arange(10), tables[0][:10])
    values, lengths = _kjt([[1, 2, 20], [3], []])
    s = cache.split(0, values, lengths)
    want_max = [tables[0][[1, 2]].max(0), tables[0][3], np.zeros(4)]
    np.testing.assert_array_equal(s.hit_pooled(Pooling.MAX).numpy(), want_max)
    assert s.hit_pooled(Pooling.MEAN) is s.hit_pooled(Pooling.SUM)  # mean pools to the sum locally
    cache.fill(0, np.array([20]), tables[0][[20]])
    with pytest.raises(RuntimeError, match="changed"):
        s.hit_pooled(Pooling.MAX)
    np.testing.assert_array_equal(s.hit_pooled(Pooling.SUM).numpy()[1], tables[0][3])  # own mode was kept


def test_bad_input_is_rejected():
    cache = RowCache(TABLES, capacity_bytes=1 << 16)
    with pytest.raises(ValueError, match="outside"):
        cache.split(0, np.array([50]), np.array([1], dtype=np.int32))
    with pytest.raises(ValueError, match="outside"):
        cache.split(0, np.array([-1]), np.array([1], dtype=np.int32))
    with pytest.raises(ValueError, match="lengths sum"):
        cache.split(0, np.array([1, 2]), np.array([1], dtype=np.int32))
    with pytest.raises(ValueError, match="shape"):
        cache.fill(1, np.array([1, 2]), np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="admission"):
        RowCache(TABLES, 0, admission="lfu")


# ---------------------------------------------------------------------- LRU fidelity and admission

def _zipf_trace(batch: int, n_batches: int):
    spec = ModelSpec(13, (32, 16), (32, 1), Interaction.DOT,
                     tuple(TableSpec(f"z{i}", 200_000, 16, Pooling.SUM) for i in range(2)))
    gen = RequestGenerator(spec, 20, zipf_exponent=1.05, seed=11)
    return spec, [gen.batch(batch)[1] for _ in range(n_batches)]


def _run_cache(spec: ModelSpec, batches, capacity_rows: int, admission: str) -> dict:
    """Serve the trace: split every table, then fetch and fill the candidates before the next batch."""
    cache = RowCache(spec.tables, capacity_rows * 16 * 4, admission=admission)
    data = np.zeros((200_000, 16), dtype=np.float32)
    for sparse in batches:
        for i, t in enumerate(spec.tables):
            cache.split(i, *sparse[t.name])
        for i, rows in cache.candidates_for_fill(1 << 30).items():
            cache.fill(i, rows, data[rows])
    return cache.stats()


def test_hit_rate_matches_offline_lru_and_admission_is_no_worse():
    spec, batches = _zipf_trace(batch=64, n_batches=150)
    trace = [np.concatenate([trace_keys(i, b[t.name][0]) for i, t in enumerate(spec.tables)]) for b in batches]
    for cap in (5_000, 20_000):
        exact = simulate_lru(trace, cap).hit_rate
        batched = simulate_lru(trace, cap, fill_after_batch=True).hit_rate
        lru = _run_cache(spec, batches, cap, "lru")
        # Same accesses, same order: within 2 pp of the textbook LRU (the cache fills after
        # each batch, so a row missed twice in one batch misses twice) ...
        assert abs(lru["hit_rate"] - exact) <= 0.02, (cap, lru["hit_rate"], exact)
        # ... and the same as an LRU that fills after each batch, up to tie-breaking.
        assert abs(lru["hit_rate"] - batched) <= 0.005, (cap, lru["hit_rate"], batched)
        assert lru["entries"] == cap and lru["used_bytes"] == cap * 64
        tiny = _run_cache(spec, batches, cap, "tinylfu")
        # The default: frequency-aware admission never loses hit rate here and fetches far fewer rows.
        assert tiny["hit_rate"] >= lru["hit_rate"] - 0.002, (cap, tiny["hit_rate"], lru["hit_rate"])
        assert tiny["fills"] < 0.5 * lru["fills"]


def test_default_admission_is_tinylfu():
    assert RowCache(TABLES, 0).admission == "tinylfu"


# ---------------------------------------------------------------------- eviction, resize, policy off

def _touch(cache: RowCache, t: int, rows: np.ndarray) -> None:
    cache.split(t, rows.astype(np.int64), np.ones(len(rows), dtype=np.int32))


def test_fill_evicts_least_recently_used():
    tables = _int_tables()
    cache = RowCache(TABLES, capacity_bytes=10 * 16, admission="lru")  # 10 rows of dim 4
    first = np.arange(10)
    cache.fill(0, first, tables[0][first])
    _touch(cache, 0, np.array([7, 8, 9]))           # now the most recent
    cache.fill(2, np.array([0, 1, 2]), tables[2][:3])  # shares the dim-4 pool: evicts 3 coldest
    s = cache.split(0, first, np.ones(10, dtype=np.int32))
    assert s.hit_mask.sum() == 7 and s.hit_mask[7:].all()
    st_ = cache.stats()
    assert st_["evictions"] == 3 and st_["entries"] == 10 and st_["used_bytes"] <= st_["capacity_bytes"]


def test_resize_shrink_keeps_the_hottest_rows_and_frees_memory():
    rng = np.random.default_rng(5)
    tables = _int_tables()
    cache = RowCache(TABLES, capacity_bytes=1 << 20, admission="lru")
    for t, spec in enumerate(TABLES):
        rows = np.arange(spec.rows)
        cache.fill(t, rows, tables[t][rows])
    hot = {t: rng.choice(spec.rows, size=5, replace=False) for t, spec in enumerate(TABLES)}
    for t in hot:
        _touch(cache, t, hot[t])
    hot_bytes = sum(5 * spec.dim * 4 for spec in TABLES)
    evicted = cache.resize(hot_bytes)
    st_ = cache.stats()
    assert st_["used_bytes"] <= st_["capacity_bytes"] == hot_bytes
    assert st_["allocated_bytes"] <= hot_bytes       # the memory really went back
    assert evicted == sum(spec.rows for spec in TABLES) - 15 == st_["evictions"]
    for t, rows in hot.items():
        s = cache.split(t, rows, np.ones(5, dtype=np.int32))
        assert s.hit_mask.all(), t
        np.testing.assert_array_equal(s.hit_pooled().numpy(), tables[t][rows])  # data moved with the slots
    cache.resize(1 << 20)                       # grow: room again, nothing lost
    assert cache.stats()["entries"] == 15
    cache.clear()
    assert cache.stats()["entries"] == 0 and cache.allocated_bytes == 0


def test_capacity_is_never_exceeded_under_random_traffic():
    rng = np.random.default_rng(9)
    tables = _int_tables()
    cache = RowCache(TABLES, capacity_bytes=300, admission="tinylfu")
    for step in range(60):
        for t, spec in enumerate(TABLES):
            lengths = rng.integers(0, 6, size=8).astype(np.int32)
            values = (rng.zipf(1.3, size=int(lengths.sum())) % spec.rows).astype(np.int64)
            cache.split(t, values, lengths)
        for t, rows in cache.candidates_for_fill(int(rng.integers(1, 40))).items():
            cache.fill(t, rows, tables[t][rows])
        if step % 10 == 5:
            cache.resize(int(rng.integers(0, 600)))
        st_ = cache.stats()
        assert st_["used_bytes"] <= st_["capacity_bytes"] and st_["allocated_bytes"] <= st_["capacity_bytes"]
    # Every cached row holds its table's data.
    for t, spec in enumerate(TABLES):
        rows = np.arange(spec.rows)
        s = cache.split(t, rows, np.ones(spec.rows, dtype=np.int32))
        if s.hit_mask.any():
            np.testing.assert_array_equal(s.hit_pooled(Pooling.SUM).numpy()[s.hit_mask], tables[t][s.hit_mask])


def test_candidates_are_deduplicated_uncached_and_bounded():
    cache = RowCache(TABLES, capacity_bytes=1 << 16, admission="lru")
    cache.fill(0, np.array([1]), np.zeros((1, 4), dtype=np.float32))
    cache.split(0, np.array([1, 2, 2, 3, 4, 2]), np.array([3, 3], dtype=np.int32))
    cache.split(1, np.array([5, 5]), np.array([2], dtype=np.int32))
    assert {t: sorted(r.tolist()) for t, r in cache.candidates_for_fill(100).items()} == {0: [2, 3, 4], 1: [5]}
    assert cache.candidates_for_fill(100) == {}  # handed out once
    cache.split(0, np.arange(20), np.array([20], dtype=np.int32))
    got = cache.candidates_for_fill(7)
    assert sum(len(r) for r in got.values()) == 7


def test_tinylfu_keeps_frequent_rows_against_a_scan():
    tables = _int_tables()
    cache = RowCache(TABLES, capacity_bytes=8 * 16, admission="tinylfu")  # 8 rows of dim 4
    hot = np.arange(8)
    for _ in range(5):
        _touch(cache, 0, hot)
        for t, rows in cache.candidates_for_fill(100).items():
            cache.fill(t, rows, tables[t][rows])
    for start in range(8, 48, 8):  # a scan of rows seen once each
        _touch(cache, 0, np.arange(start, start + 8))
        for t, rows in cache.candidates_for_fill(100).items():
            cache.fill(t, rows, tables[t][rows])
    s = cache.split(0, hot, np.ones(8, dtype=np.int32))
    assert s.hit_mask.all()


def test_policy_off_caches_nothing():
    tables = _int_tables()
    cache = RowCache(TABLES, capacity_bytes=1 << 16)
    cache.fill(0, np.arange(5), tables[0][:5])
    policy = CachePolicy(cache, mode="off")
    assert cache.capacity_bytes == 0 and cache.stats()["entries"] == 0
    values, lengths = _kjt([[0, 1, 2], [3]])
    s = cache.split(0, values, lengths)
    assert not s.hit_mask.any() and (s.miss_lengths == lengths).all()
    assert cache.candidates_for_fill(100) == {}
    assert cache.fill(0, np.arange(5), tables[0][:5]) == 0
    assert policy.update(monitor=None) == 0  # type: ignore[arg-type]  # off never consults the load
    st_ = cache.stats()
    assert st_["entries"] == st_["used_bytes"] == st_["allocated_bytes"] == 0 and st_["hits"] == 0
    assert st_["lookups"] == 4 and st_["tables"]["t0"]["lookups"] == 4


def test_stats_per_table():
    tables = _int_tables()
    cache = RowCache(TABLES, capacity_bytes=1 << 16)
    cache.fill(1, np.array([0, 1]), tables[1][:2])
    cache.split(1, np.array([0, 1, 2, 3]), np.array([4], dtype=np.int32))
    cache.split(0, np.array([0, 1]), np.array([2], dtype=np.int32))
    st_ = cache.stats()
    assert st_["hits"] == 2 and st_["lookups"] == 6 and st_["hit_rate"] == pytest.approx(2 / 6)
    assert st_["tables"]["t1"] == {"hits": 2, "lookups": 4, "hit_rate": 0.5}
    assert st_["tables"]["t0"]["hit_rate"] == 0.0
    assert st_["fills"] == 2 and st_["entries"] == 2 and st_["used_bytes"] == 2 * 8 * 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_matches_reference():
    tables = _int_tables()
    cache = RowCache(TABLES, capacity_bytes=1 << 16, device="cuda")
    for t in range(3):
        cache.fill(t, np.arange(0, 30, 2), torch.from_numpy(tables[t][0:30:2]).cuda())
        values, lengths = _kjt([[0, 1, 2, 2], [], [4, 5], [7]])
        want = pool_reference(tables[t], values, lengths, TABLES[t].pooling)
        np.testing.assert_array_equal(_served(cache, tables, t, values, lengths), want)
