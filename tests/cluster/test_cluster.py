"""A real multi-host cluster on one machine (issue 14): namespaces, links, limits, daemons.

Named after what a user would notice: the machine is left as it was (also
after ``kill -9`` of ``up``), both rankers answer exactly, a cut link costs
no request when shards are replicated, and restarting one ranker leaves the
other serving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cluster.conftest import REPO, Load, assert_same_machine, cluster_status, emrctl, machine, unique_name

pytestmark = pytest.mark.cluster


# ------------------------------------------------------------------------------------------ up and down


def test_up_then_down_leaves_the_machine_as_before(tiny_model):
    name = unique_name()
    before = machine(name)
    emrctl("cluster", "up", "--name", name, "--model", str(tiny_model), "--embedding-hosts", "2", "--rankers", "1",
           "--cpu-quota", "0.5", "--rate-gbit", "2")
    try:
        st = cluster_status(name)
        assert [h["name"] for h in st["hosts"]] == ["e0", "e1", "r0"]
        for h in st["hosts"]:
            assert h["state"] == "running" and h["pids"], h
            assert h["namespace"] in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert h["address"].startswith("10.213.")
            assert h["cpu"]["quota_cores"] == pytest.approx(0.5)
            # the host's link is limited in both directions
            for ns, dev in ((h["namespace"], "eth0"), (h["link"]["netns"], h["link"]["dev"])):
                qd = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True)
                assert "tbf" in qd.stdout and "2Gbit" in qd.stdout, qd.stdout
        (r0,) = st["rankers"]
        assert Path(r0["socket"]).exists()
        # the ranker's own status is reachable from the root namespace
        own = json.loads(emrctl("--instance", r0["instance"], "status", "--json").stdout)
        assert len(own["connections"]) == 2
        # nothing of the cluster is in the root namespace's network
        assert machine(name)["links"] == before["links"]
    finally:
        emrctl("cluster", "down", "--name", name)
    assert_same_machine(before, machine(name))


@pytest.mark.parametrize("stage", ["link", "process"])
def test_kill_9_of_up_mid_start_then_down_leaves_the_machine_as_before(tiny_model, stage):
    """``up`` dies with SIGKILL once it has made links (or started daemons); ``down`` removes it all."""
    name = unique_name()
    before = machine(name)
    state_file = Path("/run/flexemr/cluster") / name / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "emrctl", "cluster", "up", "--name", name, "--model",
                             str(tiny_model), "--embedding-hosts", "2", "--rankers", "1", "--cpu-quota", "0.5",
                             "--rate-gbit", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                journal = json.loads(state_file.read_text())["journal"]
            except (OSError, ValueError, KeyError):
                journal = []
            if sum(e["kind"] == stage for e in journal) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.01)
        else:
            raise AssertionError(f"up never reached {stage}")
        if stage == "process":
            time.sleep(0.5)   # the daemons are booting: workers forked, segments being created
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert machine(name) != before   # it did leave things behind
        r = emrctl("cluster", "down", "--name", name)
        assert "is down" in r.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        emrctl("cluster", "down", "--name", name, check=False)
    assert_same_machine(before, machine(name))


def test_clear_errors_name_what_is_wrong(tiny_model, tmp_path):
    name = unique_name()
    r = emrctl("cluster", "up", "--name", name, "--model", str(tiny_model), "--embedding-hosts", "1",
               "--cpu-quota", "0", check=False)
    assert r.returncode == 2 and "--cpu-quota" in r.stderr, r.stderr
    r = emrctl("cluster", "up", "--name", name, "--model", str(tmp_path), "--embedding-hosts", "1", check=False)
    assert r.returncode == 2 and "--model" in r.stderr and "model" in r.stderr, r.stderr
    r = emrctl("cluster", "up", "--name", name, "--model", str(tiny_model), "--embedding-hosts", "2",
               "--replicas", "3", check=False)
    assert r.returncode == 2 and "--replicas" in r.stderr, r.stderr
    r = emrctl("cluster", "up", "--name", "bad/name", "--model", str(tiny_model), "--embedding-hosts", "1",
               check=False)
    assert r.returncode == 2 and "cluster name" in r.stderr, r.stderr
    r = emrctl("cluster", "down", "--name", name, check=False)
    assert r.returncode == 1 and f"no cluster named {name!r}" in r.stderr, r.stderr
    # without root: one line, exit 2
    # (the interpreter lives under /root, so drop the effective uid only once emrctl is imported)
    as_nobody = ("import os, sys, locale, gettext, emrctl.cluster.cli, emrctl.cluster.lifecycle; "
                 "from emrctl.cli import main; os.setegid(65534); os.seteuid(65534); "
                 "main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", as_nobody, "cluster", "up", "--name", name, "--model", str(tiny_model),
                        "--embedding-hosts", "1"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "root" in r.stderr, r.stderr
    # with `ip` missing from PATH
    r = emrctl("cluster", "up", "--name", name, "--model", str(tiny_model), "--embedding-hosts", "1", check=False,
               env={**os.environ, "PATH": str(Path(sys.executable).parent)})
    assert r.returncode == 2 and "'ip'" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ 2 rankers x 3 hosts


@pytest.fixture(scope="module")
def shared(tiny_model):
    """3 embedding hosts with replicas 2, shared by 2 rankers (no hedging: a cut link must still fail nothing)."""
    name = unique_name()
    emrctl("cluster", "up", "--name", name, "--model", str(tiny_model), "--embedding-hosts", "3", "--rankers", "2",
           "--replicas", "2", "--engines", "2")
    try:
        yield cluster_status(name)
    finally:
        emrctl("cluster", "down", "--name", name)


def test_two_rankers_on_shared_embedding_hosts_answer_exactly(shared, reference):
    from flexemr.client import InferenceClient
    from flexemr.reqgen import RequestGenerator

    gen = RequestGenerator(reference.spec, ids_per_bag=8, seed=3)
    clients = [InferenceClient(r["socket"]) for r in shared["rankers"]]
    try:
        for _ in range(10):
            dense, sparse = gen.batch(24)
            want = reference.predict(dense, sparse)
            pooled_want = reference.lookup(sparse)
            for c in clients:
                np.testing.assert_allclose(c.predict(dense, sparse), want, rtol=1e-5, atol=1e-6)
                got = c.lookup(sparse)
                for t, v in pooled_want.items():
                    np.testing.assert_allclose(got[t], v, rtol=1e-5, atol=1e-6)
    finally:
        for c in clients:
            c.close()
    # each ranker holds its own connections to every embedding host
    for r in shared["rankers"]:
        own = json.loads(emrctl("--instance", r["instance"], "status", "--json").stdout)
        servers = sorted({c["server"] for c in own["connections"]})
        assert servers == [0, 1, 2], own["connections"]


def test_restarting_one_ranker_does_not_disturb_the_other(shared, reference):
    r0, r1 = shared["rankers"]
    with Load(r1["socket"], reference, clients=2, seed=1) as load:
        load.wait_ok(30)
        emrctl("cluster", "restart", "--name", shared["name"], "r0")
        load.wait_ok(30)
    assert load.failures == [] and load.wrong == 0, load.failures[:5]
    st = cluster_status(shared["name"])
    new_r0 = st["rankers"][0]
    assert new_r0["state"] == "running" and new_r0["supervisor_pid"] != r0["supervisor_pid"]
    assert st["rankers"][1]["supervisor_pid"] == r1["supervisor_pid"]
    with Load(new_r0["socket"], reference, clients=1, seed=2) as load:
        load.wait_ok(20)
    assert load.failures == [] and load.wrong == 0, load.failures[:5]


def test_an_embedding_host_link_cut_and_restored_under_load_fails_no_request(shared, reference):
    e0 = shared["embedding_hosts"][0]
    ns, dev = e0["link"]["netns"], e0["link"]["dev"]
    loads = [Load(r["socket"], reference, clients=2, seed=10 + i) for i, r in enumerate(shared["rankers"])]
    for load in loads:
        load.__enter__()
    try:
        for load in loads:
            load.wait_ok(30)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "down"], check=True)
        try:
            assert cluster_status(shared["name"])["embedding_hosts"][0]["link"]["up"] is False
            probe = subprocess.run(["ip", "netns", "exec", shared["rankers"][0]["namespace"], sys.executable, "-c",
                                    f"import socket; socket.create_connection(('{e0['address']}', 7001), timeout=0.5)"],
                                   capture_output=True, text=True)
            assert probe.returncode != 0 and "timed out" in probe.stderr, probe.stderr   # really unreachable
            time.sleep(1.0)
            for load in loads:
                load.wait_ok(30)           # served by the replicas while e0 is unreachable
        finally:
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        time.sleep(1.0)
        for load in loads:
            load.wait_ok(30)               # and after it is back
    finally:
        for load in loads:
            load.__exit__(None, None, None)
    for load in loads:
        assert load.failures == [], load.failures[:5]
        assert load.wrong == 0
    slowest = max(s for load in loads for _t, s in load.latencies)
    print(f"slowest request around the cut: {slowest * 1e3:.0f} ms")
