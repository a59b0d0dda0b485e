"""What an operator sees of embedding servers on a live cluster: status, JSON, Prometheus.

One ``flexemrd local --embedding-servers 3 --replicas 2`` for the module.  A
server is killed with SIGKILL under load; status must show it down (or its
process restarting), count the restart, show it up again under its new pid,
and the failover counters must move.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from emrctl.render import WIDTH
from flexemr.control.block import ControlBlock
from flexemr.metrics import render_metrics
from flexemr.monolithic import MonolithicModel

from tests.conftest import LocalCluster
from tests.integration.test_failover import Load


@pytest.fixture(scope="module")
def reference(tiny_model):
    return MonolithicModel(tiny_model)


@pytest.fixture(scope="module")
def replicated(tiny_model, tmp_path_factory):
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("status"), servers=3, engines=2,
                     extra=["--replicas", "2"])
    yield c
    c.stop()


def emrctl(cluster: LocalCluster, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "emrctl", "--instance", cluster.instance, "status", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def wait_snapshot(cluster: LocalCluster, pred: Callable[[dict[str, Any]], bool], what: str,
                  timeout: float = 90.0, poll_s: float = 0.01) -> dict[str, Any]:
    """Poll the control segment in-process (fast enough to see a state that lasts a fraction of a second)."""
    block = ControlBlock.attach(cluster.instance)
    try:
        deadline = time.monotonic() + timeout
        snap = block.snapshot()
        while not pred(snap):
            if time.monotonic() > deadline:
                raise AssertionError(f"status never showed {what} within {timeout} s; last servers: "
                                     f"{snap['servers']}\n{cluster.logs()[-3000:]}")
            time.sleep(poll_s)
            snap = block.snapshot()
        return snap
    finally:
        block.close()


def all_up(snap: dict[str, Any]) -> bool:
    return all(s["state"] == "up" and s["process"] == "ready" for s in snap["servers"])


def test_status_lists_three_local_servers_up_with_their_pids(replicated):
    wait_snapshot(replicated, all_up, "every server up")
    snap = json.loads(emrctl(replicated, "--json"))
    assert [s["id"] for s in snap["servers"]] == [0, 1, 2]
    assert {s["id"]: s["pid"] for s in snap["servers"]} == replicated.server_pids()
    for s in snap["servers"]:
        assert {"id", "address", "state", "pid", "restarts", "outstanding", "connections_up"} <= s.keys()
        assert s["address"].startswith(("127.0.0.1:", "shm:")) and s["restarts"] == 0 and s["connections_up"] >= 1
    assert snap["shards"] == {"0": 2, "1": 2, "2": 2} and snap["replicas"] == 2
    assert set(snap["ranker"]["failover"]) == {"reissued", "hedges_sent", "hedges_won", "failovers"}
    assert {"engines", "connections", "cache"} <= snap.keys()   # the DESIGN.md contract is still there
    text = emrctl(replicated)
    assert max(len(line) for line in text.splitlines()) <= WIDTH, text
    assert "embedding servers" in text
    assert "shards: 3 groups, all with ≥2 live replicas" in text


def test_a_killed_server_shows_down_then_its_restart_and_up_again(replicated, reference):
    wait_snapshot(replicated, all_up, "every server up")
    with Load(replicated, reference) as load:
        load.wait_ok(30)
        before = json.loads(emrctl(replicated, "--json"))
        old_pid = replicated.server_pids()[1]
        os.kill(old_pid, signal.SIGKILL)
        seen: set[tuple[str, str]] = set()     # (ranker's view, supervisor's view) of server 1

        def restarted_and_up(snap: dict[str, Any]) -> bool:
            s1 = snap["servers"][1]
            seen.add((s1["state"], s1["process"]))
            return all_up(snap) and s1["restarts"] == 1 and s1["pid"] not in (0, old_pid)

        back = wait_snapshot(replicated, restarted_and_up, "server 1 restarted and up")
        assert {view for view, _ in seen} & {"down", "reconnecting"}, f"the ranker never showed it down: {seen}"
        assert {proc for _, proc in seen} & {"restarting", "starting"}, f"no restart was shown: {seen}"
        load.wait_ok(30)                  # served meanwhile by the replicas, and after the restart
    assert load.wrong == 0
    assert back["servers"][1]["pid"] == replicated.server_pids()[1]
    after = json.loads(emrctl(replicated, "--json"))
    assert [s["restarts"] for s in after["servers"]] == [0, 1, 0]
    assert after["shards"] == {"0": 2, "1": 2, "2": 2}
    f0, f1 = before["ranker"]["failover"], after["ranker"]["failover"]
    assert f1["failovers"] + f1["reissued"] > f0["failovers"] + f0["reissued"], (f0, f1)
    block = ControlBlock.attach(replicated.instance)
    try:
        metrics = render_metrics(block)
    finally:
        block.close()
    assert f'flexemr_server_restarts_total{{address="{after["servers"][1]["address"]}",server="1"}} 1.0' in metrics
    assert 'flexemr_shard_group_live_replicas{primary="1"} 2.0' in metrics
    assert "flexemr_failovers_total" in metrics and "flexemr_reissued_subrequests_total" in metrics
