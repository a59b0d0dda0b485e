"""A hung engine (SIGSTOP) on a real ``flexemrd local``: found by its missing heartbeat, killed, restarted.

Layout: 2 embedding servers, 2 engines, ``tables`` routing and no rebalancer,
so connection 0 (server 0's tables) stays on engine 0 and connection 1
(server 1's tables) on engine 1.  Engine 1 is stopped with SIGSTOP, which no
crash detector sees (the process is alive, its sockets open); only its
heartbeat stops.  Throughout, one client looks up server 0's tables (engine 0
alone serves them), another predicts over every table (needs both engines),
and emrctl status is asked again and again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables
from flexemr.pooling import pool_reference
from flexemr.reqgen import RequestGenerator
from flexemr.routing.table import RoutingTable

from tests.conftest import LocalCluster

HEARTBEAT_TIMEOUT_S = 2.0


def _engine(cluster: LocalCluster, index: int) -> psutil.Process | None:
    for p in psutil.Process(cluster.proc.pid).children():
        try:
            if p.name() == f"flexemr-eng[{index}]" and p.status() != psutil.STATUS_ZOMBIE:
                return p
        except psutil.NoSuchProcess:
            pass
    return None


class Traffic:
    """One thread per kind of request; records (time, outcome) for each answer."""

    def __init__(self, cluster: LocalCluster, model, reference) -> None:
        spec = load_spec(model)
        self.tables = open_tables(model, spec)
        self.spec = spec
        self.reference = reference
        server0 = {sh.table for sh in RoutingTable.build(spec, 2, "tables").shards_of(0)}
        assert server0 and len(server0) < len(spec.tables)
        gen = RequestGenerator(spec, ids_per_bag=6, seed=5)
        self.predicts = [gen.batch(8) for _ in range(20)]
        self.lookups = [{t: s for t, s in sparse.items() if t in server0} for _, sparse in self.predicts]
        self.socket = cluster.socket
        self.stop = threading.Event()
        self.lookup_log: list[tuple[float, str]] = []
        self.predict_log: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._run, args=(kind,), daemon=True) for kind in ("lookup", "predict")]
        for t in self.threads:
            t.start()

    def _run(self, kind: str) -> None:
        log = self.lookup_log if kind == "lookup" else self.predict_log
        i = 0
        while not self.stop.is_set():
            dense, sparse = self.predicts[i % len(self.predicts)]
            lookup = self.lookups[i % len(self.lookups)]
            i += 1
            try:
                # A fresh connection per call: an error must not leave the next answer behind.
                with InferenceClient(self.socket, timeout=60) as c:
                    if kind == "lookup":
                        got = c.lookup(lookup)
                        exact = all(np.allclose(got[t], pool_reference(self.tables[t], v, n, self.spec.table(t).pooling),
                                                rtol=1e-5, atol=1e-6) for t, (v, n) in lookup.items())
                    else:
                        exact = np.allclose(c.predict(dense, sparse), self.reference.predict(dense, sparse),
                                            rtol=1e-5, atol=1e-6)
                log.append((time.monotonic(), "ok" if exact else "wrong answer"))
            except Exception as e:  # every failure is recorded with its message
                log.append((time.monotonic(), f"{type(e).__name__}: {e}"))
            time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


class StatusPoller:
    """``emrctl status --json`` in a loop: (started, seconds taken, returncode, engine 1's entry)."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.stop = threading.Event()
        self.calls: list[tuple[float, float, int, dict | None]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                r = subprocess.run([sys.executable, "-m", "emrctl", "--instance", self.instance, "status", "--json"],
                                   capture_output=True, text=True, timeout=30)
                code, out = r.returncode, r.stdout
            except subprocess.TimeoutExpired:
                code, out = -1, ""
            engine = None
            if code == 0:
                engine = next(e for e in json.loads(out)["engines"] if e["id"] == 1)
            self.calls.append((t0, time.monotonic() - t0, code, engine))
            time.sleep(0.1)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)


def test_a_sigstopped_engine_is_killed_and_restarted_while_the_other_keeps_serving(tiny_model, tmp_path):
    from flexemr.monolithic import MonolithicModel

    reference = MonolithicModel(tiny_model)
    c = LocalCluster(tiny_model, tmp_path, servers=2, engines=2,
                     extra=["--routing", "tables", "--no-rebalance", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S)])
    traffic = status = None
    try:
        hung = _engine(c, 1)
        engine0 = _engine(c, 0)
        assert hung is not None and engine0 is not None
        traffic = Traffic(c, tiny_model, reference)
        status = StatusPoller(c.instance)
        time.sleep(2.0)
        t_stop = time.monotonic()
        os.kill(hung.pid, signal.SIGSTOP)

        # Detected, killed and replaced by a new process that serves predicts again.
        deadline = time.monotonic() + 60
        replacement = None
        while time.monotonic() < deadline:
            replacement = _engine(c, 1)
            if replacement is not None and replacement.pid != hung.pid:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("engine 1 was not replaced:\n" + c.logs()[-3000:])
        t_replaced = time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(t > t_replaced and o == "ok" for t, o in traffic.predict_log):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("predicts did not recover after the restart:\n" + c.logs()[-3000:])
        t_recovered = time.monotonic()
        time.sleep(1.0)
        traffic.finish()
        status.finish()
        logs = c.logs()

        m = re.search(rf"engine\[1\] pid={hung.pid} missed its heartbeat for (\d+\.\d) s; killing", logs)
        assert m, "the supervisor names the hung engine and why it kills it:\n" + logs[-3000:]
        assert HEARTBEAT_TIMEOUT_S <= float(m.group(1)) < HEARTBEAT_TIMEOUT_S + 3
        assert not psutil.pid_exists(hung.pid) or psutil.Process(hung.pid).status() == psutil.STATUS_ZOMBIE
        assert t_replaced - t_stop < HEARTBEAT_TIMEOUT_S + 20
        assert logs.count("heartbeat for") == 2 and logs.count("; killing") == 1, "only the hung engine was killed"
        assert _engine(c, 0).pid == engine0.pid, "engine 0 ran throughout"

        # Engine 0 kept serving: its lookups succeeded while engine 1 was stopped, and every answer was exact.
        outcomes = traffic.lookup_log + traffic.predict_log
        assert not [o for _, o in outcomes if o == "wrong answer"]
        served_during = [t for t, o in traffic.lookup_log if t_stop < t < t_replaced and o == "ok"]
        assert len(served_during) >= 3, f"engine 0 served {len(served_during)} lookups while engine 1 hung"
        # Failures are only the hung engine's in-flight work, and say so.
        failures = [o for _, o in outcomes if o != "ok"]
        assert all("engine 1" in f for f in failures), failures
        assert all(o == "ok" for t, o in traffic.lookup_log if t < t_stop)

        # emrctl status answered throughout: before, during the hang, across the restart.
        window = [call for call in status.calls if t_stop <= call[0] <= t_recovered]
        assert len(window) >= 2, f"only {len(window)} status calls during the restart"
        assert all(code == 0 for _, _, code, _ in status.calls), status.calls
        assert max(took for _, took, _, _ in status.calls) < 10, "status never waits for a booting engine"
        last = status.calls[-1][3]
        assert last["pid"] == replacement.pid and last["restarts"] == 1, last
    finally:
        if traffic is not None:
            traffic.finish()
        if status is not None:
            status.finish()
        c.stop()
