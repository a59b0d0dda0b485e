"""Range routing and hierarchical pooling: split + per-server pooling + combine == pooling whole tables.

The oracle is ``pool_reference`` over each whole table (float64 numpy).  The
system under test is what the ranker and the embedding servers do between
them: ``split_batch`` routes each id to the server holding its row, each
server pools its share of every bag (partial *sums* for mean tables, maxima
for max tables, zeros for a bag it got no ids of), and ``combine_partials``
merges the partials using the per-server counts from the split.

Subrequests are compact (protocol 3): a server gets only the bags with ids
for it, and the answer is scattered back to them; the harness checks that
no empty bag travels and combines both ways (compact scatter, and the
partials expanded to the whole batch through ``combine_partials``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.errors import ConfigError
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.pooling import pool_reference
from flexemr.routing import RoutingTable, Shard, combine_partials, split_batch
from flexemr.routing.combine import combine_compact
from flexemr.types import Interaction, Pooling

RTOL, ATOL = 1e-5, 1e-6


def _spec(tables: list[TableSpec]) -> ModelSpec:
    return ModelSpec(dense_features=1, bottom_mlp=(4,), top_mlp=(1,), interaction=Interaction.CAT,
                     tables=tuple(tables))


def _partial_mode(p: Pooling) -> Pooling:
    """What an embedding server computes for a table: mean travels as a partial sum."""
    return Pooling.MAX if p is Pooling.MAX else Pooling.SUM


def _route_and_pool(routing: RoutingTable, data: dict[str, np.ndarray], batch: int,
                    sparse: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """The distributed path: split, pool per server (numpy), combine; also checks each part's routing."""
    spec = routing.spec
    tidx = list(range(len(spec.tables)))
    plan = split_batch(routing, batch, tidx, [sparse[t.name][0] for t in spec.tables],
                       [sparse[t.name][1] for t in spec.tables])
    assert plan.batch == batch
    partials: dict[int, list[np.ndarray]] = {i: [] for i in tidx}
    counts: dict[int, list[np.ndarray]] = {i: [] for i in tidx}
    compact: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {i: [] for i in tidx}
    for server, part in plan.parts.items():
        assert part.server == server
        assert part.tables == sorted(part.tables), "tables travel in model order"
        for t, v, ln, rows in zip(part.tables, part.values, part.lengths, part.rows):
            ts = spec.tables[t]
            assert int(ln.sum()) == len(v) and len(v) > 0, "a table travels only with ids for the server"
            assert (ln > 0).all(), "no bag without ids for the server travels"
            if rows is None:
                assert ln.shape == (batch,)
            else:
                assert ln.shape == rows.shape and len(rows) < batch
                assert (np.diff(rows) > 0).all() and rows.min() >= 0 and rows.max() < batch
            # Every id sent to this server is one of its rows: a server never sees another's id.
            assert (routing.server_of(t, v) == server).all(), f"{ts.name}: ids routed to the wrong server"
            p = pool_reference(data[ts.name], v, ln, _partial_mode(ts.pooling))
            compact[t].append((p, ln, rows))
            # The same partial as a full-batch one (zeros, count 0, for the bags not sent).
            full_p = np.zeros((batch, ts.dim), np.float32)
            full_ln = np.zeros(batch, np.int32)
            sel = slice(None) if rows is None else rows
            full_p[sel], full_ln[sel] = p, ln
            partials[t].append(full_p)
            counts[t].append(full_ln)
    out = {}
    for t in tidx:
        ts = spec.tables[t]
        values, lengths = sparse[ts.name]
        if not partials[t]:
            # No server got a subrequest: the table had no ids in this batch.
            assert len(values) == 0
            out[ts.name] = np.zeros((batch, ts.dim), np.float32)
            continue
        # Every id went somewhere, exactly once, and bags kept their sizes.
        np.testing.assert_array_equal(np.sum(counts[t], axis=0), lengths)
        assert sum(len(v) for s, p in plan.parts.items() for tt, v in zip(p.tables, p.values) if tt == t) == len(values)
        out[ts.name] = combine_partials(ts.pooling, partials[t], counts[t])
        scattered = combine_compact(ts.pooling, batch, ts.dim, lengths, *map(list, zip(*compact[t])))
        np.testing.assert_allclose(scattered, out[ts.name], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{ts.name}: compact scatter differs from the full-batch combine")
    return out


def _check_against_whole_tables(routing, data, batch, sparse) -> None:
    got = _route_and_pool(routing, data, batch, sparse)
    for t in routing.spec.tables:
        want = pool_reference(data[t.name], *sparse[t.name], t.pooling)
        assert got[t.name].shape == (batch, t.dim) and got[t.name].dtype == np.float32
        np.testing.assert_allclose(got[t.name], want, rtol=RTOL, atol=ATOL, err_msg=f"{t.name} ({t.pooling.label})")


# ------------------------------------------------------------------ strategies


@st.composite
def models(draw):
    n = draw(st.integers(1, 4))
    tables = [TableSpec(f"t{i}", rows=draw(st.integers(1, 131)), dim=draw(st.integers(1, 5)),
                        pooling=draw(st.sampled_from(list(Pooling)))) for i in range(n)]
    return _spec(tables)


@st.composite
def routings(draw, spec: ModelSpec):
    n_servers = draw(st.integers(1, 5))
    strategy = draw(st.sampled_from(["rows", "tables", "interleaved"]))
    if strategy != "interleaved":
        return RoutingTable.build(spec, n_servers, strategy)
    # Arbitrary cuts, each range on any server: a server may own several
    # disjoint ranges of one table, and some servers none.
    shards = []
    for t in spec.tables:
        cuts = sorted(draw(st.sets(st.integers(1, t.rows - 1), max_size=6))) if t.rows > 1 else []
        bounds = [0, *cuts, t.rows]
        for a, b in zip(bounds, bounds[1:]):
            shards.append(Shard(t.name, a, b, (draw(st.integers(0, n_servers - 1)),)))
    return RoutingTable(spec, n_servers, shards)


def _boundaries(routing: RoutingTable, t: TableSpec) -> list[int]:
    """Ids on both sides of every shard boundary of ``t`` (and the table's ends)."""
    ids = {0, t.rows - 1}
    for s in routing.shards:
        if s.table == t.name:
            ids.update({s.start - 1, s.start, s.end - 1, s.end})
    return sorted(i for i in ids if 0 <= i < t.rows)


@st.composite
def batches(draw, routing: RoutingTable):
    batch = draw(st.integers(0, 7))
    sparse = {}
    for t in routing.spec.tables:
        ids = st.one_of(st.sampled_from(_boundaries(routing, t)), st.integers(0, t.rows - 1))
        bags = []
        for _ in range(batch):
            kind = draw(st.sampled_from(["empty", "one", "repeat", "mixed"]))
            if kind == "empty":
                bags.append([])
            elif kind == "one":
                bags.append([draw(ids)])
            elif kind == "repeat":
                bags.append([draw(ids)] * draw(st.integers(2, 6)))
            else:
                bags.append(draw(st.lists(ids, max_size=12)))
        sparse[t.name] = (np.array([i for b in bags for i in b], np.int64),
                          np.array([len(b) for b in bags], np.int32))
    return batch, sparse


def _tables(spec: ModelSpec, seed: int, negative: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in spec.tables:
        a = rng.standard_normal((t.rows, t.dim), dtype=np.float32)
        # All-negative rows catch a max that lets an empty partial's zeros win.
        out[t.name] = -np.abs(a) - np.float32(0.01) if negative else a
    return out


# ------------------------------------------------------------------ property


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**32 - 1), negative=st.booleans())
def test_split_pool_combine_equals_pooling_whole_tables(data, seed, negative):
    spec = data.draw(models())
    routing = data.draw(routings(spec))
    batch, sparse = data.draw(batches(routing))
    _check_against_whole_tables(routing, _tables(spec, seed, negative), batch, sparse)


# ------------------------------------------------------------------ edge cases, by hand

ODD = [TableSpec("a", 1001, 3, Pooling.SUM), TableSpec("b", 517, 2, Pooling.MEAN),
       TableSpec("c", 2003, 4, Pooling.MAX), TableSpec("d", 7, 1, Pooling.MAX)]


def _sparse(spec, bags_per_table: dict[str, list[list[int]]]):
    return {n: (np.array([i for b in bags for i in b], np.int64), np.array([len(b) for b in bags], np.int32))
            for n, bags in bags_per_table.items()}


@pytest.mark.parametrize("strategy", ["rows", "tables"])
@pytest.mark.parametrize("n_servers", [1, 2, 3, 4, 5])
def test_edge_cases_every_strategy_and_server_count(strategy, n_servers):
    spec = _spec(ODD)
    routing = RoutingTable.build(spec, n_servers, strategy)
    for negative in (False, True):
        data = _tables(spec, 11, negative)
        bags = {}
        for t in spec.tables:
            i = spec.table_index(t.name)
            first = int(routing.server_of(i, np.array([0]))[0])
            cut = routing.ranges_of(i, first)[0][1]  # first shard boundary (or the table end)
            lo, hi = max(0, cut - 1), min(t.rows - 1, cut)
            bags[t.name] = [
                [],                           # empty bag
                [lo],                         # one id
                [hi, hi, hi, hi],             # repeated id
                [lo, hi, lo, hi],             # both sides of a shard boundary
                [0, t.rows - 1],              # first and last rows: first and last server
                [],                           # empty bag between full ones
                list(range(min(t.rows, 3))),  # all ids on the first server
                [t.rows - 1] * 2,             # all ids on the last server
                [],                           # trailing empty bag
            ]
        _check_against_whole_tables(routing, data, 9, _sparse(spec, bags))


def test_zero_bags_and_all_empty_bags():
    spec = _spec(ODD)
    routing = RoutingTable.build(spec, 3, "rows")
    data = _tables(spec, 1, True)
    _check_against_whole_tables(routing, data, 0, _sparse(spec, {t.name: [] for t in spec.tables}))
    _check_against_whole_tables(routing, data, 4, _sparse(spec, {t.name: [[]] * 4 for t in spec.tables}))


def test_max_ignores_the_zero_partial_of_a_server_that_pooled_nothing():
    """All ids on one server; the others' partials are zeros on the wire and must not win a max."""
    spec = _spec([TableSpec("m", 10, 2, Pooling.MAX)])
    routing = RoutingTable.build(spec, 2, "rows")  # [0, 5) on server 0, [5, 10) on server 1
    data = {"m": -np.arange(1, 21, dtype=np.float32).reshape(10, 2)}
    sparse = _sparse(spec, {"m": [[1, 2], [7], [], [2, 8]]})
    got = _route_and_pool(routing, data, 4, sparse)["m"]
    np.testing.assert_array_equal(got, [[-3, -4], [-15, -16], [0, 0], [-5, -6]])


def test_mean_divides_by_the_whole_bag_not_per_server():
    spec = _spec([TableSpec("m", 10, 1, Pooling.MEAN)])
    routing = RoutingTable.build(spec, 2, "rows")
    data = {"m": np.arange(10, dtype=np.float32).reshape(10, 1)}
    got = _route_and_pool(routing, data, 2, _sparse(spec, {"m": [[0, 9, 9], [4]]}))["m"]
    np.testing.assert_allclose(got[:, 0], [6.0, 4.0])  # (0 + 9 + 9) / 3, not (0/1 + 18/2)


def test_rows_strategy_cuts_contiguous_near_equal_ranges_and_tables_keeps_tables_whole():
    spec = _spec(ODD)
    routing = RoutingTable.build(spec, 3, "rows")
    for i, t in enumerate(spec.tables):
        sizes = [sum(b - a for a, b in routing.ranges_of(i, s)) for s in range(3)]
        assert sum(sizes) == t.rows and max(sizes) - min(sizes) <= 1, (t.name, sizes)
    routing = RoutingTable.build(spec, 3, "tables")
    for i, t in enumerate(spec.tables):
        assert len(routing.servers_of_table(i)) == 1
        assert routing.ranges_of(i, int(routing.servers_of_table(i)[0])) == [(0, t.rows)]
    # Largest first onto the least loaded: the three biggest tables land on three different servers.
    big = sorted(range(4), key=lambda i: -spec.tables[i].nbytes)[:3]
    assert len({int(routing.servers_of_table(i)[0]) for i in big}) == 3


def test_more_servers_than_rows():
    spec = _spec([TableSpec("x", 2, 3, Pooling.SUM), TableSpec("y", 1, 3, Pooling.MAX)])
    routing = RoutingTable.build(spec, 5, "rows")
    data = _tables(spec, 5, True)
    _check_against_whole_tables(routing, data, 3, _sparse(spec, {"x": [[0, 1], [1], []], "y": [[0], [], [0, 0]]}))


# ------------------------------------------------------------------ validation


def _table_problem(shards, n_servers=3):
    spec = _spec([TableSpec("a", 100, 4), TableSpec("b", 51, 4)])
    with pytest.raises(ConfigError) as e:
        RoutingTable(spec, n_servers, shards)
    return str(e.value)


B_WHOLE = Shard("b", 0, 51, (0,))


def test_gap_is_rejected_naming_table_and_row():
    msg = _table_problem([Shard("a", 0, 40, (0,)), Shard("a", 50, 100, (1,)), B_WHOLE])
    assert "'a'" in msg and "gap at row 40" in msg


def test_overlap_is_rejected_naming_table_and_row():
    msg = _table_problem([Shard("a", 0, 60, (0,)), Shard("a", 50, 100, (1,)), B_WHOLE])
    assert "'a'" in msg and "overlap at row 50" in msg


def test_short_and_long_coverage_are_rejected():
    msg = _table_problem([Shard("a", 0, 99, (0,)), B_WHOLE])
    assert "'a'" in msg and "[0, 99)" in msg and "100 rows" in msg
    msg = _table_problem([Shard("a", 0, 100, (0,)), Shard("b", 0, 52, (1,))])
    assert "'b'" in msg and "[0, 52)" in msg and "51 rows" in msg


def test_table_without_shards_is_rejected():
    msg = _table_problem([Shard("a", 0, 100, (0,))])
    assert "'b'" in msg and "[0, 0)" in msg


def test_unknown_table_is_rejected_by_name():
    msg = _table_problem([Shard("a", 0, 100, (0,)), B_WHOLE, Shard("zz", 0, 10, (1,))])
    assert "unknown table 'zz'" in msg


def test_server_outside_the_cluster_is_rejected():
    msg = _table_problem([Shard("a", 0, 100, (3,)), B_WHOLE], n_servers=3)
    assert "a[0:100]" in msg and "outside 0..2" in msg


def test_every_problem_is_reported_at_once():
    msg = _table_problem([Shard("a", 0, 40, (0,)), Shard("a", 50, 100, (1,)), Shard("q", 0, 1, (0,))])
    assert "gap at row 40" in msg and "unknown table 'q'" in msg and "'b'" in msg


def test_build_rejects_bad_arguments():
    spec = _spec(ODD)
    with pytest.raises(ConfigError, match="at least one"):
        RoutingTable.build(spec, 0, "rows")
    with pytest.raises(ConfigError, match="'diagonal'"):
        RoutingTable.build(spec, 2, "diagonal")
