"""End to end: ``flexemrd local`` with 3 embedding servers and 2 engines, real processes.

Every answer is compared with the monolithic reference (the same model in one
process over the same tables) and with a numpy pooling reference.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import numpy as np
import psutil
import pytest

from flexemr import naming
from flexemr.client import InferenceClient
from flexemr.errors import RequestError
from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables
from flexemr.pooling import pool_reference
from flexemr.reqgen import RequestGenerator

from tests.conftest import LocalCluster


@pytest.fixture(scope="module")
def reference(tiny_model):
    from flexemr.monolithic import MonolithicModel

    return MonolithicModel(tiny_model)


def _requests(spec, n, seed, batch_sizes=(1, 3, 17, 64)):
    gen = RequestGenerator(spec, ids_per_bag=6, zipf_exponent=1.05, seed=seed)
    rng = np.random.default_rng(seed)
    return [gen.batch(int(rng.choice(batch_sizes))) for _ in range(n)]


def test_predict_and_lookup_match_references_under_concurrency(cluster, tiny_model, reference):
    """8 concurrent clients, 1,000+ requests: every answer equals the references."""
    spec = load_spec(tiny_model)
    tables = open_tables(tiny_model, spec)

    def worker(k: int) -> int:
        checked = 0
        with InferenceClient(cluster.socket) as c:
            for i, (dense, sparse) in enumerate(_requests(spec, 130, seed=100 + k)):
                if i % 2:
                    got = c.predict(dense, sparse)
                    want = reference.predict(dense, sparse)
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                else:
                    pooled = c.lookup(sparse)
                    for t in spec.tables:
                        v, ln = sparse[t.name]
                        np.testing.assert_allclose(pooled[t.name], pool_reference(tables[t.name], v, ln, t.pooling),
                                                   rtol=1e-5, atol=1e-5)
                checked += 1
        return checked

    with cf.ThreadPoolExecutor(8) as ex:
        total = sum(ex.map(worker, range(8)))
    assert total >= 1000


def test_lookup_of_a_subset_and_edge_bags(cluster, tiny_model):
    spec = load_spec(tiny_model)
    tables = open_tables(tiny_model, spec)
    t = spec.tables[1]
    rows = t.rows
    # empty bag, one id, repeated ids, ids on both sides of every shard boundary, first and last row
    bags = [[], [5], [7, 7, 7], [0, rows - 1], list(range(rows // 3 - 2, rows // 3 + 2)),
            list(range(2 * rows // 3 - 2, 2 * rows // 3 + 2))]
    values = np.array([i for b in bags for i in b], dtype=np.int64)
    lengths = np.array([len(b) for b in bags], dtype=np.int32)
    with InferenceClient(cluster.socket) as c:
        pooled = c.lookup({t.name: (values, lengths)})
    assert list(pooled) == [t.name]
    np.testing.assert_allclose(pooled[t.name], pool_reference(tables[t.name], values, lengths, t.pooling),
                               rtol=1e-5, atol=1e-6)
    assert not pooled[t.name][0].any(), "an empty bag pools to zeros"


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda spec, d, s: s.__setitem__(spec.tables[0].name, (np.array([spec.tables[0].rows]), np.array([1], np.int32))), "past the end"),
        (lambda spec, d, s: s.__setitem__(spec.tables[0].name, (np.array([-1]), np.array([1], np.int32))), "negative"),
        (lambda spec, d, s: s.__setitem__("no_such_table", (np.array([1]), np.array([1], np.int32))), "unknown table"),
        (lambda spec, d, s: s.__setitem__(spec.tables[0].name, (np.array([1, 2]), np.array([1], np.int32))), "sum to"),
    ],
)
def test_bad_requests_raise_request_error_and_the_next_one_succeeds(cluster, tiny_model, reference, mutate, field):
    spec = load_spec(tiny_model)
    (dense, sparse), = _requests(spec, 1, seed=5, batch_sizes=(1,))
    bad = dict(sparse)
    mutate(spec, dense, bad)
    with InferenceClient(cluster.socket) as c:
        with pytest.raises(RequestError, match=field):
            c.predict(dense, bad)
        np.testing.assert_allclose(c.predict(dense, sparse), reference.predict(dense, sparse), rtol=1e-5, atol=1e-6)


def test_wrong_dense_width_is_refused_by_the_ranker(cluster, tiny_model, reference):
    spec = load_spec(tiny_model)
    (dense, sparse), = _requests(spec, 1, seed=6, batch_sizes=(2,))
    with InferenceClient(cluster.socket) as c:
        with pytest.raises(RequestError, match="dense"):
            c.predict(np.zeros((2, spec.dense_features + 1), np.float32), sparse)
        np.testing.assert_allclose(c.predict(dense, sparse), reference.predict(dense, sparse), rtol=1e-5, atol=1e-6)


def test_a_bad_request_does_not_affect_concurrent_good_ones(cluster, tiny_model, reference):
    spec = load_spec(tiny_model)
    good = _requests(spec, 60, seed=9)
    name = spec.tables[2].name

    def bad_client() -> int:
        n = 0
        with InferenceClient(cluster.socket) as c:
            for _ in range(60):
                with pytest.raises(RequestError):
                    c.lookup({name: (np.array([10 ** 9]), np.array([1], np.int32))})
                n += 1
        return n

    def good_client() -> int:
        with InferenceClient(cluster.socket) as c:
            for dense, sparse in good:
                np.testing.assert_allclose(c.predict(dense, sparse), reference.predict(dense, sparse), rtol=1e-5, atol=1e-6)
        return len(good)

    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(bad_client), ex.submit(good_client), ex.submit(good_client), ex.submit(bad_client)]
        assert [f.result() for f in futs] == [60, 60, 60, 60]


def test_sigterm_drains_accepted_requests_and_leaves_nothing_behind(tiny_model, tmp_path, reference):
    spec = load_spec(tiny_model)
    c = LocalCluster(tiny_model, tmp_path, servers=2, engines=2)
    kids = c.children()
    assert len(kids) >= 5
    reqs = _requests(spec, 400, seed=11)
    answered = []
    errors = []

    def client():
        try:
            with InferenceClient(c.socket) as cl:
                for dense, sparse in reqs:
                    answered.append(np.allclose(cl.predict(dense, sparse), reference.predict(dense, sparse), rtol=1e-5, atol=1e-6))
        except (ConnectionError, OSError, RequestError, Exception) as e:  # after the drain the socket closes
            errors.append(type(e).__name__)

    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(client) for _ in range(4)]
        time.sleep(1.0)
        t0 = time.monotonic()
        code = c.stop(signal.SIGTERM, timeout=20)
        elapsed = time.monotonic() - t0
        for f in futs:
            f.result()
    assert code == 0, c.logs()[-3000:]
    assert elapsed < 15
    assert answered and all(answered), "every answer that arrived is exact"
    assert not os.path.exists(c.socket)
    assert naming.list_instance_segments(c.instance) == []
    assert not [p for p in kids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_engine_crash_under_load_fails_fast_and_recovers(tiny_model, tmp_path, reference):
    """kill -9 an engine: affected requests fail quickly with a clear error, the engine restarts,
    and requests succeed again (and stay exact)."""
    spec = load_spec(tiny_model)
    c = LocalCluster(tiny_model, tmp_path, servers=2, engines=2)
    try:
        reqs = _requests(spec, 40, seed=13)
        import psutil as ps

        engines = [p for p in ps.Process(c.proc.pid).children() if p.name().startswith("flexemr-eng")]
        assert len(engines) == 2
        outcomes: list[str] = []
        slow: list[float] = []

        def client():
            with InferenceClient(c.socket) as cl:
                for dense, sparse in reqs * 3:
                    t0 = time.monotonic()
                    try:
                        got = cl.predict(dense, sparse)
                        outcomes.append("ok" if np.allclose(got, reference.predict(dense, sparse), rtol=1e-5,
                                                            atol=1e-6) else "wrong")
                    except Exception as e:
                        outcomes.append(type(e).__name__)
                        slow.append(time.monotonic() - t0)

        with cf.ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(client) for _ in range(3)]
            time.sleep(0.5)
            os.kill(engines[0].pid, signal.SIGKILL)
            for f in futs:
                f.result()
        assert "wrong" not in outcomes
        assert not slow or max(slow) < 10, "failed requests fail fast, not at the 30 s timeout"
        # After the restart everything is served again.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with InferenceClient(c.socket) as cl:
                    dense, sparse = reqs[0]
                    np.testing.assert_allclose(cl.predict(dense, sparse), reference.predict(dense, sparse),
                                               rtol=1e-5, atol=1e-6)
                break
            except Exception as e:
                last_error = repr(e)
                time.sleep(0.5)
        else:
            raise AssertionError(f"the ranker did not recover after the engine restart ({last_error}):\n"
                                 + c.logs()[-2000:])
        assert "restarting" in c.logs()
    finally:
        c.stop()


@pytest.mark.parametrize("extra", [["--credits", "inband"], ["--credits", "off"], ["--mapping", "shared"]],
                         ids=["inband-credits", "no-credits", "shared-mapping"])
def test_every_flow_control_and_mapping_mode_serves_exact_answers(tiny_model, tmp_path, reference, extra):
    """The comparison modes of the benchmarks must be correct too, not only the defaults."""
    spec = load_spec(tiny_model)
    c = LocalCluster(tiny_model, tmp_path, servers=2, engines=2, extra=extra)
    try:
        def client(k: int) -> int:
            with InferenceClient(c.socket) as cl:
                for dense, sparse in _requests(spec, 40, seed=30 + k):
                    np.testing.assert_allclose(cl.predict(dense, sparse), reference.predict(dense, sparse),
                                               rtol=1e-5, atol=1e-6)
            return 40

        with cf.ThreadPoolExecutor(3) as ex:
            assert sum(ex.map(client, range(3))) == 120
    finally:
        c.stop()
