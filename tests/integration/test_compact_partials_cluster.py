"""Compact partials on a live cluster: bags the cache answers whole, and empty bags, never reach a server.

A real ``flexemrd local`` (2 embedding servers, fixed cache) is warmed on a
few hot rows per table; then every batch has hot bags (all ids cached),
empty bags and cold bags.  Answers must stay exact, and the servers' own
``bags_pooled`` counters (STATS) must grow by less than the batch times the
tables: only the cold bags were pooled there.
"""

from __future__ import annotations

import time

import numpy as np

from flexemr import naming
from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables
from flexemr.pooling import pool_reference

from flexemr_bench.systems import server_stats
from tests.conftest import LocalCluster

HOT = 3          # hot rows per table: what the cache ends up holding
BATCH = 24       # 8 hot bags, 8 empty bags, 8 cold bags per table


def _batch(spec, rng: np.random.Generator, cold: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    sparse = {}
    for t in spec.tables:
        hot = [rng.integers(0, HOT, 4) for _ in range(8)]
        empty = [np.zeros(0, np.int64)] * 8
        far = [rng.integers(HOT, t.rows, 3) if cold else rng.integers(0, HOT, 4) for _ in range(8)]
        bags = [b for trio in zip(hot, empty, far) for b in trio]     # interleaved: the scatter must hit each
        sparse[t.name] = (np.concatenate(bags).astype(np.int64), np.array([len(b) for b in bags], np.int32))
    return sparse


def _bags_pooled(c: LocalCluster) -> int:
    secret = naming.local_secret_path(c.instance)
    ports = c.listening_ports()
    assert len(ports) == 2, ports
    return sum(server_stats(("127.0.0.1", p), secret_file=secret)["bags_pooled"] for p in ports)


def _assert_exact(pooled, sparse, spec, tables) -> None:
    for t in spec.tables:
        v, ln = sparse[t.name]
        np.testing.assert_allclose(pooled[t.name], pool_reference(tables[t.name], v, ln, t.pooling),
                                   rtol=1e-5, atol=1e-5, err_msg=t.name)


def test_bags_the_cache_answers_whole_are_not_sent_and_answers_stay_exact(tiny_model, tmp_path):
    spec = load_spec(tiny_model)
    tables = open_tables(tiny_model, spec)
    # TCP between engines and servers: the servers then listen, so the test can ask them for STATS
    # (the split is the same for every transport).
    c = LocalCluster(tiny_model, tmp_path, servers=2, engines=1,
                     extra=["--transport", "tcp", "--cache-policy", "fixed", "--cache-size", "1MiB"])
    try:
        rng = np.random.default_rng(5)
        with InferenceClient(c.socket) as cl:
            # Warm: only hot rows, until the cache holds them (fills follow the misses, off the request path).
            deadline = time.monotonic() + 60
            while True:
                before = _bags_pooled(c)
                warm = _batch(spec, rng, cold=False)
                _assert_exact(cl.lookup(warm), warm, spec, tables)
                if _bags_pooled(c) == before:
                    break                          # every bag was answered by the cache alone
                assert time.monotonic() < deadline, "the cache never came to hold the hot rows"
                time.sleep(0.1)
            before = _bags_pooled(c)
            n = 5
            for _ in range(n):
                sparse = _batch(spec, rng)
                _assert_exact(cl.lookup(sparse), sparse, spec, tables)
            pooled = _bags_pooled(c) - before
        full = n * BATCH * len(spec.tables)        # one partial per bag and table (the old path sent >= this)
        cold = n * 8 * len(spec.tables)            # the cold bags: at most one partial per server holding ids
        assert 0 < pooled <= 2 * cold < full, (pooled, cold, full)
    finally:
        c.stop()
