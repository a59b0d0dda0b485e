"""The ranker's cache on a live cluster: exact answers with it on, hits, runtime commands, adaptive shrink."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables
from flexemr.pooling import pool_reference
from flexemr.reqgen import RequestGenerator

from tests.conftest import LocalCluster


def status(instance: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "emrctl", "--instance", instance, "status", "--json"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def emrctl(instance: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emrctl", "--instance", instance, *args],
                          capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from flexemr.monolithic import MonolithicModel

    return MonolithicModel(tiny_model)


def test_answers_with_the_cache_on_equal_the_references_and_it_hits(tiny_model, tmp_path, reference):
    spec = load_spec(tiny_model)
    tables = open_tables(tiny_model, spec)
    c = LocalCluster(tiny_model, tmp_path, servers=3, engines=2,
                     extra=["--cache-policy", "fixed", "--cache-size", "64KiB"])
    try:
        gen = RequestGenerator(spec, ids_per_bag=8, zipf_exponent=1.2, seed=21)
        with InferenceClient(c.socket) as cl:
            for i in range(150):
                dense, sparse = gen.batch(32)
                if i % 2:
                    np.testing.assert_allclose(cl.predict(dense, sparse), reference.predict(dense, sparse),
                                               rtol=1e-5, atol=1e-6)
                else:
                    pooled = cl.lookup(sparse)
                    for t in spec.tables:
                        v, ln = sparse[t.name]
                        np.testing.assert_allclose(pooled[t.name], pool_reference(tables[t.name], v, ln, t.pooling),
                                                   rtol=1e-5, atol=1e-5)
        time.sleep(0.6)
        cache = status(c.instance)["cache"]
        assert cache["policy"] == "fixed"
        assert cache["capacity_bytes"] == 64 << 10
        assert 0 < cache["used_bytes"] <= 64 << 10
        assert cache["fills"] > 0 and cache["hits"] > 0
        assert cache["hit_rate"] > 0.2, cache
    finally:
        c.stop()


def test_resize_and_policy_take_effect_under_load_and_stay_exact(tiny_model, tmp_path, reference):
    spec = load_spec(tiny_model)
    c = LocalCluster(tiny_model, tmp_path, servers=2, engines=2,
                     extra=["--cache-policy", "fixed", "--cache-size", "64KiB"])
    try:
        gen = RequestGenerator(spec, ids_per_bag=8, zipf_exponent=1.2, seed=22)
        reqs = [gen.batch(32) for _ in range(60)]

        def drive(n: int) -> None:
            with InferenceClient(c.socket) as cl:
                for dense, sparse in reqs[:n]:
                    np.testing.assert_allclose(cl.predict(dense, sparse), reference.predict(dense, sparse),
                                               rtol=1e-5, atol=1e-6)

        drive(60)
        r = emrctl(c.instance, "cache", "resize", "16KiB")
        assert r.returncode == 0, r.stdout + r.stderr
        drive(30)
        time.sleep(0.5)
        cache = status(c.instance)["cache"]
        assert cache["capacity_bytes"] == 16 << 10 and cache["used_bytes"] <= 16 << 10
        r = emrctl(c.instance, "cache", "policy", "off")
        assert r.returncode == 0, r.stdout + r.stderr
        drive(30)
        time.sleep(0.5)
        cache = status(c.instance)["cache"]
        assert cache["policy"] == "off" and cache["used_bytes"] == 0
    finally:
        c.stop()


def test_adaptive_cache_shrinks_when_batches_grow_and_no_request_fails(tiny_model, tmp_path):
    spec = load_spec(tiny_model)
    c = LocalCluster(tiny_model, tmp_path, servers=2, engines=2,
                     extra=["--cache-policy", "adaptive", "--cache-size", "8MiB", "--cache-budget", "8MiB",
                            "--cache-margin", "512KiB", "--max-batch", "8192"])
    try:
        gen = RequestGenerator(spec, ids_per_bag=4, zipf_exponent=1.1, seed=23)
        with InferenceClient(c.socket) as cl:
            for _ in range(20):
                d, s = gen.batch(256)
                cl.lookup(s)
            time.sleep(0.6)
            small = status(c.instance)["cache"]["capacity_bytes"]
            big = [gen.batch(8192) for _ in range(3)]
            for _ in range(4):
                for d, s in big:
                    assert cl.predict(d, s).shape == (8192,)
            time.sleep(0.6)
            large = status(c.instance)["cache"]["capacity_bytes"]
        assert small > 0
        assert large < small, f"capacity {small} at batch 256 should shrink at batch 8192, got {large}"
    finally:
        c.stop()
