"""Huge-page resident copies of tables: same bytes, read-only, never past the memory budget."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.hugepages import HUGE_PAGE, available_memory, resident_copy


def test_a_resident_copy_holds_the_same_rows_read_only_on_a_huge_page_boundary(tmp_path):
    table = np.random.default_rng(1).standard_normal((5000, 24)).astype(np.float32)
    path = tmp_path / "t.npy"
    np.save(path, table)
    mapped = np.load(path, mmap_mode="r")
    copy = resident_copy(mapped, budget=1 << 30)
    assert copy is not None
    np.testing.assert_array_equal(copy, table)
    assert copy.dtype == table.dtype and copy.shape == table.shape and copy.flags.c_contiguous
    assert copy.ctypes.data % HUGE_PAGE == 0
    with pytest.raises(ValueError, match="read-only"):
        copy[0, 0] = 1.0


def test_a_table_over_the_budget_is_not_copied():
    table = np.ones((1000, 16), dtype=np.float32)
    assert resident_copy(table, budget=table.nbytes - 1) is None
    assert resident_copy(table[:0], budget=1 << 30) is None


def test_available_memory_reads_the_kernels_estimate():
    avail = available_memory()
    assert avail is None or avail > 0


def test_a_store_pools_the_same_partials_from_resident_copies_and_names_bad_ids(tiny_model):
    """resident=True changes where rows are read, never an answer or an error."""
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator
    from flexemr.routing.table import RoutingTable
    from flexemr.wire import codec
    from flexemrd.embedding.store import EmbeddingStore, RequestRejected

    spec = load_spec(tiny_model)
    shards = RoutingTable.build(spec, 1, "tables").shards_of(0)
    mapped = EmbeddingStore(str(tiny_model), spec, shards)
    resident = EmbeddingStore(str(tiny_model), spec, shards, resident=True)
    assert resident.resident_tables == len(spec.tables) and mapped.resident_tables == 0
    _, sparse = RequestGenerator(spec, ids_per_bag=7, seed=3).batch(50)
    tids = list(range(len(spec.tables)))
    frame = codec.encode_lookup(1, 50, tids, [sparse[spec.tables[t].name][1] for t in tids],
                                [sparse[spec.tables[t].name][0] for t in tids])
    payload = b"".join(bytes(memoryview(b).cast("B")) for b in frame[1:])
    for want, got in zip(mapped.pool(codec.decode_lookup(payload)), resident.pool(codec.decode_lookup(payload))):
        np.testing.assert_array_equal(got, want)
    bad = codec.encode_lookup(2, 1, [0], [np.array([1], dtype=np.int32)], [np.array([spec.tables[0].rows])])
    with pytest.raises((RequestRejected, RuntimeError), match=str(spec.tables[0].rows)):
        resident.pool(codec.decode_lookup(b"".join(bytes(memoryview(b).cast("B")) for b in bad[1:])))


def test_the_monolithic_pooler_answers_the_same_from_resident_copies(tiny_model):
    from flexemr.model.spec import load_spec
    from flexemr.model.tables import open_tables
    from flexemr.reqgen import RequestGenerator
    from flexemrd.inference.local import LocalPooler

    spec = load_spec(tiny_model)
    maps = open_tables(tiny_model, spec)
    mapped, resident = LocalPooler(spec, maps), LocalPooler(spec, maps, resident=True)
    assert all(p.table.ctypes.data % HUGE_PAGE == 0 for p in resident.poolers)
    _, sparse = RequestGenerator(spec, ids_per_bag=5, seed=9).batch(40)
    for i, t in enumerate(spec.tables):
        v, ln = sparse[t.name]
        np.testing.assert_array_equal(resident.pool(i, v, ln), mapped.pool(i, v, ln))


def test_the_in_process_limit_gathers_from_copies_too_and_answers_the_same(tiny_model):
    """The benchmarks' limit (MonolithicModel(resident=True)) gets the daemons' memory layout, same answers."""
    from flexemr.model.spec import load_spec
    from flexemr.monolithic import MonolithicModel
    from flexemr.reqgen import RequestGenerator

    spec = load_spec(tiny_model)
    mapped, resident = MonolithicModel(tiny_model), MonolithicModel(tiny_model, resident=True)
    assert all(resident.tables[t.name].ctypes.data % HUGE_PAGE == 0 for t in spec.tables)
    assert all(isinstance(mapped.tables[t.name], np.memmap) for t in spec.tables)
    dense, sparse = RequestGenerator(spec, ids_per_bag=5, seed=4).batch(32)
    np.testing.assert_array_equal(resident.predict(dense, sparse), mapped.predict(dense, sparse))
    for name, got in resident.lookup(sparse).items():
        np.testing.assert_array_equal(got, mapped.lookup(sparse)[name])


def test_servers_sharing_a_host_split_its_copy_budget(tiny_model):
    """Each server starting on a host gets its share of the budget: with enough of them none copies."""
    from flexemr.model.spec import load_spec
    from flexemr.routing.table import RoutingTable
    from flexemrd.embedding.store import EmbeddingStore

    spec = load_spec(tiny_model)
    shards = RoutingTable.build(spec, 1, "tables").shards_of(0)
    alone = EmbeddingStore(str(tiny_model), spec, shards, resident=True)
    crowded = EmbeddingStore(str(tiny_model), spec, shards, resident=True, resident_share=1 << 40)
    assert alone.resident_tables == len(spec.tables)
    assert crowded.resident_tables == 0 and crowded.resident_budget < 1 << 20
