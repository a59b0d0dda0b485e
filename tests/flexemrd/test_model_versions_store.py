"""Model versions in one embedding server's store: side by side, exact deltas, refusals, release."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from flexemr.errors import ModelError
from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables, table_path
from flexemr.model.versions import is_delta, read_delta, write_delta
from flexemr.pooling import TablePooler
from flexemr.routing.table import RoutingTable
from flexemr.types import Pooling
from flexemr.wire import codec
from flexemr.wire.frame import ErrorCode

from flexemrd.embedding.store import EmbeddingStore, RequestRejected


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """v1 = tiny seed 7; a 1% delta of every table; v2 = v1 with the delta applied (a full copy, the reference)."""
    from flexemr.model.presets import init_model_dir

    root = tmp_path_factory.mktemp("versions")
    v1 = root / "v1"
    init_model_dir(v1, "tiny", seed=7)
    spec = load_spec(v1)
    rng = np.random.default_rng(3)
    changes = {}
    for t in spec.tables:
        ids = rng.choice(t.rows, size=max(1, t.rows // 100), replace=False)
        changes[t.name] = (ids, rng.normal(0, 1, (len(ids), t.dim)).astype(np.float32))
    delta = write_delta(root / "delta", changes)
    v2 = root / "v2"
    shutil.copytree(v1, v2)
    for name, (ids, rows) in changes.items():
        arr = np.load(table_path(v2, name))
        arr[ids] = rows
        np.save(table_path(v2, name), arr)
    return spec, v1, delta, v2


def _lookup(spec, table_ids, rng, batch=16, version=0):
    values, lengths = [], []
    for tid in table_ids:
        t = spec.tables[tid]
        ln = rng.integers(0, 7, batch).astype(np.int32)
        values.append(rng.integers(0, t.rows, int(ln.sum())).astype(np.int64))
        lengths.append(ln)
    frame = codec.encode_lookup(1, batch, table_ids, lengths, values, version=version)
    payload = b"".join(bytes(memoryview(b).cast("B")) for b in frame[1:])
    return codec.decode_lookup(payload, int.from_bytes(frame[0][8:12], "little"))


def cow_table(pooler: TablePooler):
    return pooler.table


def test_delta_version_pools_exactly_like_the_full_table_for_sum_mean_and_max(models):
    spec, v1, delta, v2 = models
    shards = RoutingTable.build(spec, 1, "tables", 1).shards_of(0)
    store = EmbeddingStore(str(v1), spec, shards)
    store.load_delta(2, 1, str(delta))
    full = open_tables(v2, spec)
    rng = np.random.default_rng(0)
    tids = list(range(len(spec.tables)))
    req = _lookup(spec, tids, rng, version=2)
    assert req.version == 2
    got = store.pool(req)
    for i, tid in enumerate(tids):
        t = spec.tables[tid]
        values, lengths = req.kjt.table(i)
        cow = store.versions[2].tables[tid].pooler
        for pooling in (Pooling.SUM, Pooling.MEAN, Pooling.MAX):
            # every pooling over the copy-on-write table equals the same pooling over the full new table
            np.testing.assert_array_equal(TablePooler(cow_table(cow), pooling).partial(values, lengths),
                                          TablePooler(np.array(full[t.name]), pooling).partial(values, lengths))
        want = TablePooler(np.array(full[t.name]), t.pooling).partial(values, lengths)
        np.testing.assert_array_equal(got[i], want)   # bit for bit: same kernel, same values
    # the boot version still answers with its own rows
    old = store.pool(_lookup(spec, tids, np.random.default_rng(0), version=1))
    base = open_tables(v1, spec)
    values, lengths = req.kjt.table(0)
    np.testing.assert_array_equal(old[0], TablePooler(np.array(base[spec.tables[0].name]),
                                                      spec.tables[0].pooling).partial(values, lengths))


def test_delta_shares_unchanged_tables_and_writes_only_held_rows(models):
    spec, v1, delta, _v2 = models
    shards = RoutingTable.build(spec, 1, "tables", 1).shards_of(0)
    store = EmbeddingStore(str(v1), spec, shards)
    # a delta of one table only: the other tables are the very same objects
    one = write_delta(delta.parent / "one", {spec.tables[0].name: (np.array([0, 5]), np.ones((2, spec.tables[0].dim),
                                                                                              np.float32))})
    store.load_delta(2, 1, str(one))
    assert store.versions[2].tables[1] is store.versions[1].tables[1]
    assert store.versions[2].tables[0] is not store.versions[1].tables[0]
    assert is_delta(one) and not is_delta(v1)


def test_a_version_not_held_is_refused_naming_it_and_retired_versions_are_gone(models):
    spec, v1, delta, _v2 = models
    store = EmbeddingStore(str(v1), spec, RoutingTable.build(spec, 1, "tables", 1).shards_of(0))
    with pytest.raises(RequestRejected) as e:
        store.pool(_lookup(spec, [0], np.random.default_rng(0), version=9))
    assert e.value.code == ErrorCode.UNKNOWN_VERSION and "version 9" in str(e.value)
    store.load_delta(2, 1, str(delta))
    assert store.retire(1)
    with pytest.raises(RequestRejected, match="version 1 is not held"):
        store.fetch(0, np.array([1, 2]), 1)
    assert store.fetch(0, np.array([1, 2]), 2).shape == (2, spec.tables[0].dim)


def test_retiring_a_version_gives_its_huge_page_copies_back_to_the_budget(models):
    """Full pushes one after another keep gathering from copies: a retired version's copies are budget again."""
    spec, v1, delta, v2 = models
    store = EmbeddingStore(str(v1), spec, RoutingTable.build(spec, 1, "tables", 1).shards_of(0), resident=True)
    if store.resident_tables == 0:
        pytest.skip("no huge-page copies on this host (madvise missing or no memory)")
    booted_budget, booted_tables = store.resident_budget, store.resident_tables
    store.load_full(2, str(v2))
    assert store.resident_budget < booted_budget and store.resident_tables == 2 * booted_tables
    assert store.retire(1)
    assert (store.resident_budget, store.resident_tables) == (booted_budget, booted_tables)
    # a delta shares its base's unchanged tables: retiring the base keeps those counted
    one = write_delta(delta.parent / "one-resident", {spec.tables[0].name: (np.array([0]),
                                                                            np.ones((1, spec.tables[0].dim), np.float32))})
    store.load_delta(3, 2, str(one))
    assert store.retire(2)
    assert store.resident_tables == booted_tables
    assert store.fetch(0, np.array([0]), 3)[0].tolist() == [1.0] * spec.tables[0].dim


def test_bad_deltas_and_models_are_refused_with_the_file_named(models, tmp_path):
    spec, v1, _delta, _v2 = models
    t = spec.tables[0]
    bad = write_delta(tmp_path / "bad", {t.name: (np.array([t.rows]), np.zeros((1, t.dim), np.float32))})
    with pytest.raises(ModelError, match=rf"{t.name}.ids.npy: ids must lie in \[0, {t.rows}\)"):
        read_delta(bad, spec)
    store = EmbeddingStore(str(v1), spec, RoutingTable.build(spec, 1, "tables", 1).shards_of(0))
    from flexemr.model.presets import init_model_dir

    other = tmp_path / "other"
    init_model_dir(other, "tiny-cat", seed=1)
    with pytest.raises(ModelError, match="interaction"):
        store.load_full(2, str(other))
