"""RowCache's vectorised index against a dict model: fills, evictions, resizes and whole-batch lookups.

The model is a plain dict {(table, row): last use} with an explicit clock;
the cache must agree with it on what is present (hits and misses of
``split_many``), on what the hits pool to, on keeping the least recently used
rows out first (its shared eviction order must never evict a row hotter than
one it keeps), and on refusing ids past a table's end.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.cache import RowCache
from flexemr.model.spec import TableSpec
from flexemr.types import Pooling

# One pool (the same dim) so eviction is one LRU order across tables; both pooling kinds.
TABLES = (TableSpec("a", 40, 4, Pooling.SUM), TableSpec("b", 25, 4, Pooling.MAX), TableSpec("c", 33, 4, Pooling.MEAN))
ROW_BYTES = 16


def _value(t: int, rows: np.ndarray) -> np.ndarray:
    """A row's data, a function of (table, row): small integers, so sums are exact in any order."""
    r = np.asarray(rows, dtype=np.int64)
    return np.stack([(t * 7 + r * 3 + k) % 11 - 5 for k in range(4)], axis=1).astype(np.float32)


class Model:
    def __init__(self, capacity_rows: int) -> None:
        self.cap = capacity_rows
        self.last: dict[tuple[int, int], int] = {}
        self.clock = 0


def _check_index(cache: RowCache, model: Model) -> None:
    present = {(t, int(r)) for t in range(len(TABLES)) for r in np.flatnonzero(cache._slot_of_row[t] >= 0)}
    assert present == set(model.last), "the index holds exactly the model's rows"
    assert cache.entries == len(present) and cache.used_bytes == len(present) * ROW_BYTES <= cache.capacity_bytes
    pool = cache._pools[4]
    free = set(pool.free.tolist())
    live = set(np.flatnonzero(pool.tab >= 0).tolist())
    assert not free & live and free | live == set(range(pool.alloc)), "free list = the free slots, each once"
    assert len(pool.free) == len(free)


ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("fill"), st.integers(0, 2), st.lists(st.integers(0, 39), max_size=12)),
        st.tuples(st.just("lookup"), st.lists(st.lists(st.integers(0, 24), max_size=5), max_size=6)),
        st.tuples(st.just("resize"), st.integers(0, 30)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_st, cap_rows=st.integers(1, 30))
def test_index_equals_a_dict_model_under_fills_evictions_resizes_and_lookups(ops, cap_rows):
    cache = RowCache(TABLES, cap_rows * ROW_BYTES, admission="lru")
    model = Model(cap_rows)
    for op in ops:
        if op[0] == "fill":
            _, t, rows = op
            rows = np.array([r for r in rows if r < TABLES[t].rows], dtype=np.int64)
            before = dict(model.last)
            n = cache.fill(t, rows, _value(t, rows))
            new = {(t, int(r)) for r in np.unique(rows)} - set(before)
            assert n == min(len(new), model.cap), "every new row goes in, up to the capacity"
            # Who left: the coldest rows; never one hotter than a row that stayed.
            _sync_after_fill(cache, model, t, before)
            gone = set(before) - set(model.last)
            kept = set(before) & set(model.last)
            if gone and kept:
                assert max(before[k] for k in gone) <= min(before[k] for k in kept), "evicted a hotter row"
        elif op[0] == "lookup":
            bags = op[1]
            values = np.array([i for b in bags for i in b], dtype=np.int64)
            lengths = np.array([len(b) for b in bags], dtype=np.int32)
            splits = cache.split_many([0, 1, 2], [values] * 3, [lengths] * 3)
            model.clock += 1
            for t, sp in enumerate(splits):
                want = np.array([(t, int(v)) in model.last for v in values], dtype=bool)
                assert (sp.hit_mask == want).all(), f"table {t}: hits are the model's rows"
                assert (sp.miss_values == values[~want]).all(), "misses keep their order"
                assert (sp.hit_counts + sp.miss_lengths == lengths).all()
                pooled = sp.hit_pooled().cpu().numpy()
                for b, bag in enumerate(bags):
                    hits = [v for v in bag if (t, v) in model.last]
                    if not hits:
                        assert (pooled[b] == 0).all(), "a bag without hits pools to zeros"
                        continue
                    rows = _value(t, np.array(hits))
                    ref = rows.max(axis=0) if TABLES[t].pooling is Pooling.MAX else rows.sum(axis=0)
                    assert (pooled[b] == ref).all(), f"table {t} bag {b}"
            for t in range(3):
                for v in values:
                    if (t, int(v)) in model.last:
                        model.last[(t, int(v))] = model.clock
        else:
            _, rows_cap = op
            before = dict(model.last)
            cache.resize(rows_cap * ROW_BYTES)
            model.cap = rows_cap
            _sync_after_fill(cache, model, None, before)
            gone, kept = set(before) - set(model.last), set(model.last)
            assert len(kept) <= rows_cap
            if gone and kept and rows_cap:
                assert max(before[k] for k in gone) <= min(before[k] for k in kept), "shrinking kept a colder row"
        _check_index(cache, model)


def _sync_after_fill(cache: RowCache, model: Model, t: int | None, before: dict) -> None:
    """Bring the model to the cache's contents: new rows get the clock now, evicted rows leave."""
    present = {(tt, int(r)) for tt in range(len(TABLES)) for r in np.flatnonzero(cache._slot_of_row[tt] >= 0)}
    assert present <= set(before) | ({(t, r) for r in range(TABLES[t].rows)} if t is not None else set()), \
        "nothing appears that was not filled"
    model.last = {k: before.get(k, model.clock) for k in present}


def test_a_full_cache_evicts_in_lru_order_across_many_fills_from_one_shared_order():
    """The eviction order computed once serves many fills; a row touched since it was computed must not be
    evicted by it, and the rows evicted are always the coldest ones."""
    tables = (TableSpec("t", 100_000, 4, Pooling.SUM),)
    cap = 20_000
    cache = RowCache(tables, cap * ROW_BYTES, admission="lru")
    one = np.ones(1, np.int32)
    for chunk in range(40):   # 500 rows per clock tick (an eviction's worth): row r was last used at tick r // 500
        rows = np.arange(chunk * 500, (chunk + 1) * 500)
        cache.fill(0, rows, np.ones((500, 4), np.float32))
        cache.split(0, np.array([99_999]), one)                       # a miss: only the clock moves
    # The first eviction computes the shared order: rows 0.. (the oldest) at its front.
    assert cache.fill(0, np.arange(cap, cap + 500), np.ones((500, 4), np.float32)) == 500
    hot = np.arange(500, 2_500)          # at the front of that order, now touched: the hottest rows
    cache.split(0, hot, np.ones(len(hot), np.int32))
    for k in range(1, 8):                # more fills from the same order, 500 evictions each
        rows = np.arange(cap + k * 500, cap + (k + 1) * 500)
        assert cache.fill(0, rows, np.ones((500, 4), np.float32)) == 500
    present = cache._slot_of_row[0] >= 0
    assert not present[:500].any(), "the first fill evicted the 500 oldest"
    assert present[hot].all(), "rows touched after the order was made survived it"
    assert not present[2_500:6_000].any() and present[6_000:cap].all(), "then the next-oldest went, in order"
    assert present[cap:cap + 4_000].all() and cache.entries == cap


def test_ids_past_a_tables_end_are_refused_by_name():
    cache = RowCache(TABLES, 1 << 12)
    with pytest.raises(ValueError, match=r"b: id 25 is outside the table's rows \[0, 25\)"):
        cache.split_many([0, 1], [np.array([3]), np.array([25])], [np.array([1], np.int32)] * 2)
    with pytest.raises(ValueError, match=r"fill: row ids must be in \[0, 40\) for table a"):
        cache.fill(0, np.array([40]), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="split_many: 2 tables, 1 values and 1 lengths"):
        cache.split_many([0, 1], [np.array([3])], [np.array([1], np.int32)])


def test_split_many_answers_like_split_table_by_table():
    rng = np.random.default_rng(3)
    a, b = RowCache(TABLES, 40 * ROW_BYTES, admission="lru"), RowCache(TABLES, 40 * ROW_BYTES, admission="lru")
    for t in range(3):
        rows = rng.choice(TABLES[t].rows, 12, replace=False)
        a.fill(t, rows, _value(t, rows))
        b.fill(t, rows, _value(t, rows))
    lengths = rng.integers(0, 6, size=30).astype(np.int32)
    values = [rng.integers(0, TABLES[t].rows, size=int(lengths.sum())) for t in range(3)]
    many = a.split_many([2, 0, 1], [values[2], values[0], values[1]], [lengths] * 3)
    for sp in many:
        one = b.split(sp.table, values[sp.table], lengths)
        assert (sp.hit_mask == one.hit_mask).all() and (sp.miss_values == one.miss_values).all()
        assert (sp.hit_counts == one.hit_counts).all()
        assert (sp.hit_pooled().numpy() == one.hit_pooled().numpy()).all()
        if TABLES[sp.table].pooling is not Pooling.MAX:
            assert (sp.hit_pooled(Pooling.MAX).numpy() == one.hit_pooled(Pooling.MAX).numpy()).all()
