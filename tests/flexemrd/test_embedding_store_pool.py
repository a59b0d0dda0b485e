"""The store's pooling of a decoded LOOKUP: every layout and id width gives the same exact partials.

A LOOKUP whose tables all carry the B bags (the plain [T, B] layout) is pooled
from one cumsum of all its tables' lengths; a compact one (fewer bags for some
tables) table by table.  Both must give what the reference pools, bit for bit
alike for the same bags, empty bags included (zeros in every mode), with int32
or int64 ids; an id past a table's end is rejected by name.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables
from flexemr.pooling import partial_pooling, pool_reference
from flexemr.routing.table import RoutingTable
from flexemr.wire import codec

from flexemrd.embedding.store import EmbeddingStore, RequestRejected


@pytest.fixture(scope="module")
def world(tiny_model):
    spec = load_spec(tiny_model)
    store = EmbeddingStore(str(tiny_model), spec, RoutingTable.build(spec, 1, "tables").shards_of(0))
    return spec, store, open_tables(tiny_model, spec)


def _lookup(batch, tids, lengths, values, narrow):
    frame = codec.encode_lookup(7, batch, tids, lengths, values, narrow_ids=narrow)
    payload = b"".join(bytes(memoryview(b).cast("B")) for b in frame[1:])
    return codec.decode_lookup(bytearray(payload))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), batch=st.integers(1, 40), narrow=st.booleans())
def test_plain_and_compact_lookups_pool_exactly_like_the_reference(world, data, batch, narrow):
    spec, store, tables = world
    tids = data.draw(st.lists(st.integers(0, len(spec.tables) - 1), min_size=1, max_size=4, unique=True))
    lengths, values = [], []
    for t in tids:
        ln = np.array(data.draw(st.lists(st.integers(0, 5), min_size=batch, max_size=batch)), dtype=np.int32)
        lengths.append(ln)
        values.append(np.array(data.draw(st.lists(st.integers(0, spec.tables[t].rows - 1),
                                                  min_size=int(ln.sum()), max_size=int(ln.sum()))), dtype=np.int64))
    plain = store.pool(_lookup(batch, tids, lengths, values, narrow))
    # The same bags sent compact: the first table carries one bag fewer (its last one, sent empty-handed
    # to keep the ids equal), so the whole request goes table by table.
    short = [lengths[0][:-1], *lengths[1:]]
    cut = int(lengths[0][-1])
    cvalues = [values[0][: len(values[0]) - cut], *values[1:]]
    compact = store.pool(_lookup(batch, tids, short, cvalues, narrow))
    for i, t in enumerate(tids):
        tab = spec.tables[t]
        want = pool_reference(tables[tab.name], values[i], lengths[i], partial_pooling(tab.pooling))
        assert plain[i].shape == (batch, tab.dim)
        np.testing.assert_allclose(plain[i], want, rtol=1e-5, atol=1e-6, err_msg=tab.name)
        rows = batch - 1 if i == 0 else batch
        np.testing.assert_array_equal(compact[i], plain[i][:rows], err_msg=tab.name)


def test_an_id_past_a_tables_end_is_rejected_by_name(world):
    spec, store, _tables = world
    rows = spec.tables[2].rows
    bad = _lookup(2, [0, 2], [np.array([1, 1], np.int32)] * 2,
                  [np.array([0, 1]), np.array([3, rows])], narrow=True)
    with pytest.raises(RequestRejected, match=f"table t2: id {rows} is outside"):
        store.pool(bad)
    ok = _lookup(1, [2], [np.array([1], np.int32)], [np.array([rows - 1])], narrow=True)
    assert store.pool(ok)[0].shape == (1, spec.tables[2].dim)   # and the store keeps pooling
