"""Control plane on a live cluster under load: status, live migration, rebalancer, emrctl errors.

Real processes: ``flexemrd local`` and ``emrctl`` as subprocesses, clients on
the unix socket comparing every answer with the monolithic reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.reqgen import RequestGenerator

from tests.conftest import LocalCluster
from tests.helpers.daemons import free_port


def emrctl(instance: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emrctl", "--instance", instance, *args],
                          capture_output=True, text=True, timeout=timeout)


class Load:
    """Clients predicting in a loop, checking every answer against the reference."""

    def __init__(self, sock: str, reference, requests, clients: int = 3) -> None:
        self.sock, self.ref, self.requests = sock, reference, requests
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, k: int) -> None:
        with InferenceClient(self.sock) as c:
            i = k
            while not self.stop.is_set():
                dense, sparse = self.requests[i % len(self.requests)]
                i += 1
                try:
                    got = c.predict(dense, sparse)
                except Exception as e:  # every failure counts
                    self.failures.append(repr(e))
                    continue
                if not np.allclose(got, self.ref.predict(dense, sparse), rtol=1e-5, atol=1e-6):
                    self.failures.append("wrong answer")
                self.ok += 1

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from flexemr.monolithic import MonolithicModel

    return MonolithicModel(tiny_model)


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory):
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("ctl"), servers=3, engines=2, extra=["--no-rebalance"])
    yield c
    c.stop()


def _requests(model, n=40, seed=3):
    gen = RequestGenerator(load_spec(model), ids_per_bag=6, seed=seed)
    return [gen.batch(16) for _ in range(n)]


def test_status_json_has_the_contract_fields(live):
    r = emrctl(live.instance, "status", "--json")
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)
    assert len(snap["engines"]) == 2
    for e in snap["engines"]:
        assert {"id", "pid", "cpu", "connections", "queue_depth"} <= set(e)
        assert e["pid"] > 0
    assert len(snap["connections"]) == 3
    for c in snap["connections"]:
        assert {"id", "server", "engine", "queued", "credits"} <= set(c)
    assert {"policy", "capacity_bytes", "used_bytes", "hit_rate"} <= set(snap["cache"])


def test_human_status_fits_100_columns(live):
    r = emrctl(live.instance, "status")
    assert r.returncode == 0, r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= 100
    assert "engine" in r.stdout.lower()


def test_migrate_under_load_both_ways_loses_nothing(live, tiny_model, reference):
    load = Load(live.socket, reference, _requests(tiny_model))
    try:
        time.sleep(0.5)
        moves = []
        for to in (1, 0, 1, 0):
            r = emrctl(live.instance, "migrate", "0", "--to", str(to))
            assert r.returncode == 0, r.stdout + r.stderr
            snap = json.loads(emrctl(live.instance, "status", "--json").stdout)
            moves.append(snap["connections"][0]["engine"])
            time.sleep(0.2)
        assert moves == [1, 0, 1, 0], "status shows the new owner after each move"
        served_before = load.ok
        time.sleep(0.5)
        assert load.ok > served_before, "traffic keeps flowing after the moves"
    finally:
        load.finish()
    assert load.failures == [], load.failures[:3]
    assert load.ok > 20
    logs = live.logs()
    assert logs.count("moved from engine") >= 4


def test_migrate_no_wait_returns_before_the_move_is_confirmed(live, tiny_model, reference):
    """--no-wait answers once the move started; the ranker then confirms it and traffic keeps flowing."""
    load = Load(live.socket, reference, _requests(tiny_model))
    try:
        time.sleep(0.3)
        start = json.loads(emrctl(live.instance, "status", "--json").stdout)
        to = 1 - start["connections"][1]["engine"]
        ranker = start["ranker"]["pid"]
        os.kill(ranker, signal.SIGSTOP)   # the ranker cannot confirm the move while stopped
        try:
            r = emrctl(live.instance, "migrate", "1", "--to", str(to), "--no-wait", "--json")
            assert r.returncode == 0, r.stdout + r.stderr
            started = json.loads(r.stdout)
            assert started["confirmed"] is False and started["engine"] == to and started["epoch"] > start["epoch"]
            again = emrctl(live.instance, "migrate", "1", "--to", str(1 - to))
            assert again.returncode != 0 and "still moving" in again.stdout + again.stderr, again.stdout + again.stderr
        finally:
            os.kill(ranker, signal.SIGCONT)
        deadline = time.monotonic() + 15
        while True:
            snap = json.loads(emrctl(live.instance, "status", "--json").stdout)
            if snap["ranker"]["epoch_seen"] >= started["epoch"]:
                break
            assert time.monotonic() < deadline, f"the ranker never confirmed epoch {started['epoch']}"
            time.sleep(0.1)
        assert snap["connections"][1]["engine"] == to
        served = load.ok
        time.sleep(0.5)
        assert load.ok > served
    finally:
        load.finish()
    assert load.failures == [], load.failures[:3]
    deadline = time.monotonic() + 5
    while "connection 1 moved from engine" not in live.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"(epoch {started['epoch']})" in live.logs(), "the supervisor logs the confirmation of a move it did not wait for"


@pytest.mark.parametrize("args, message", [
    (("migrate", "0", "--to", "7"), "no engine 7"),
    (("migrate", "99", "--to", "0"), "no connection 99"),
])
def test_emrctl_errors_are_clear_and_non_zero(live, args, message):
    r = emrctl(live.instance, *args)
    assert r.returncode != 0
    assert message in (r.stdout + r.stderr)
    assert "Traceback" not in r.stderr


def test_emrctl_against_a_daemon_that_is_not_running():
    r = emrctl("nosuchinstance", "status")
    assert r.returncode == 2
    assert "not running" in r.stderr
    assert "Traceback" not in r.stderr


def test_rebalancer_moves_a_connection_off_an_overloaded_engine(tiny_model, tmp_path, reference):
    """Engine 0 owns the connections of the only tables the traffic touches; the rebalancer spreads them."""
    spec = load_spec(tiny_model)
    c = LocalCluster(tiny_model, tmp_path, servers=4, engines=2, extra=["--routing", "tables"])
    try:
        snap = json.loads(emrctl(c.instance, "status", "--json").stdout)
        hot_servers = {conn["server"] for conn in snap["connections"] if conn["engine"] == 0}
        # Table placement: find the tables held by engine 0's servers and send only those.
        topo_tables = _tables_by_server(spec, 4)
        hot_tables = [t for s in hot_servers for t in topo_tables[s]]
        assert hot_tables, "engine 0 owns connections to servers holding tables"
        gen = RequestGenerator(spec, ids_per_bag=30, seed=4)
        reqs = []
        for _ in range(30):
            dense, sparse = gen.batch(1024)
            reqs.append({t: sparse[t] for t in hot_tables})
        stop = threading.Event()
        errors: list[str] = []

        def client() -> None:
            with InferenceClient(c.socket) as cl:
                i = 0
                while not stop.is_set():
                    try:
                        cl.lookup(reqs[i % len(reqs)])
                    except Exception as e:
                        errors.append(repr(e))
                    i += 1

        threads = [threading.Thread(target=client, daemon=True) for _ in range(12)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        moved = False
        while time.monotonic() < deadline and not moved:
            time.sleep(0.5)
            moved = "rebalancer: moving connection" in c.logs()
        stop.set()
        for t in threads:
            t.join(30)
        assert moved, c.logs()[-2000:]
        assert errors == []
        snap = json.loads(emrctl(c.instance, "status", "--json").stdout)
        owners = [conn["engine"] for conn in snap["connections"] if conn["server"] in hot_servers]
        assert set(owners) == {0, 1}, "the hot connections are now spread over both engines"
    finally:
        c.stop()


def _tables_by_server(spec, n_servers: int) -> dict[int, list[str]]:
    from flexemr.routing import RoutingTable

    rt = RoutingTable.build(spec, n_servers, "tables")
    return {s: [sh.table for sh in rt.shards_of(s)] for s in range(n_servers)}


def test_prometheus_endpoint_serves_live_counters(tiny_model, tmp_path):
    import urllib.request

    port = free_port()
    c = LocalCluster(tiny_model, tmp_path, servers=2, engines=2, extra=["--metrics-port", str(port)])
    try:
        spec = load_spec(tiny_model)
        gen = RequestGenerator(spec, ids_per_bag=5, seed=1)
        with InferenceClient(c.socket) as cl:
            for _ in range(20):
                d, s = gen.batch(8)
                cl.lookup(s)
        time.sleep(1.0)  # the inference process publishes every 0.2 s
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "flexemr_engine_queue_depth" in text
        lines = [ln for ln in text.splitlines() if ln.startswith("flexemr_table_lookups_total{")]
        assert lines and sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) >= 20 * 8
    finally:
        c.stop()
