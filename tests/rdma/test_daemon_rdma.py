"""``flexemrd local --transport rdma``: 3 embedding servers, 2 engines, frames over soft-RoCE.

One cluster for the module (the guest's emulated CPU takes minutes to import
torch in four processes).  Every lookup() and predict() answer equals the
monolithic reference made on the host (tests/rdma/reference.py) for the tiny
model (odd table sizes, every pooling mode); the logs say RDMA on the device
for every engine and server and name each connection's QP; the bytes that
cross TCP in the whole run (HELLOs only) are under 1% of the pooled bytes
served, measured by the kernel (``ss -tin``), so the data went over verbs.

Then failures, under load (a client thread checking every answer): a
server whose data QPs are forced to the error state (the embedding server's
test hook: SIGUSR2 with FLEXEMR_RDMA_TEST_HOOKS=1) is reconnected by the
engines over RDMA again; a server killed with SIGKILL is restarted by the
supervisor and served over RDMA again.  In both, every request either gets
the exact answer or fails with an error naming the server: none is lost
silently, none is wrong.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.rdma.daemon import BOOT_S, engine_status, rdma_cluster
from tests.rdma.peers import counter

pytestmark = pytest.mark.rdma




def tcp_bytes() -> int:
    """Bytes sent over every established TCP connection of this host (both ends counted)."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True, check=True).stdout
    return sum(int(m) for m in re.findall(r"bytes_sent:(\d+)", out))


@pytest.fixture(scope="module")
def cluster(answers, tmp_path_factory, rdma_device):
    tcp0 = tcp_bytes()
    with rdma_cluster(answers["model"], tmp_path_factory.mktemp("cluster"), servers=3, engines=2, prefix="r",
                      env={"FLEXEMR_RDMA_TEST_HOOKS": "1"}) as c:
        yield {**c, "tcp0": tcp0}


def test_lookup_and_predict_equal_the_monolithic_model_and_only_hellos_cross_tcp(cluster, answers,
                                                                                 rdma_device) -> None:
    from flexemr.client import InferenceClient

    pkts0 = counter(rdma_device, "rcvd_pkts")
    served = 0
    with InferenceClient(cluster["socket"]) as c:
        for case in answers["cases"]:
            pooled = c.lookup(case["sparse"])
            assert sorted(pooled) == sorted(case["lookup"])
            for name, want in case["lookup"].items():
                np.testing.assert_allclose(pooled[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
                served += want.nbytes
            got = c.predict(case["dense"], case["sparse"])
            np.testing.assert_allclose(got, case["predict"], rtol=1e-5, atol=1e-6)
            served += sum(w.nbytes for w in case["lookup"].values())  # the partials predict pooled too
    crossed_tcp = tcp_bytes() - cluster["tcp0"]
    log = cluster["log"].read_text()
    # Really verbs: each engine and each server opened the device, every connection has a QP.
    assert log.count(f"RDMA on {rdma_device} port 1 gid") >= 5, log[-3000:]
    assert log.count("transport: rdma on") == 2, "both engines chose rdma"
    assert len(re.findall(r"over RDMA \(data QP", log)) == 3, "one data connection per server, over verbs"
    assert len(re.findall(r"over RDMA \(credit QP", log)) == 3, "and its credit channel"
    assert "Traceback" not in log, log[-3000:]
    # Responses land in shm the ranker reads in place (blob v3): no engine copies a large payload.
    assert len(re.findall(r"over RDMA \(data QP 0x[0-9a-f]+\); responses land in /flexemr\.", log)) == 3, log[-3000:]
    copied = [int(n) for n in re.findall(r"bytes copied, of them (\d+) in responses of", log)]
    assert all(n == 0 for n in copied), f"engines copied large payloads: {copied}"
    engines = engine_status(cluster["instance"])   # what emrctl status and the metrics show
    assert sum(e["bytes_lent"] for e in engines) > 0, engines
    assert all(e["large_bytes_copied"] == 0 for e in engines), engines
    assert counter(rdma_device, "rcvd_pkts") - pkts0 >= 2 * len(answers["cases"])
    assert crossed_tcp < 0.01 * served, f"{crossed_tcp} bytes crossed TCP for {served} bytes served"


def server_pids(proc: subprocess.Popen) -> dict[str, int]:
    """{"flexemr-emb[i]": pid} of the cluster's embedding servers (the process titles flexemrd sets)."""
    import psutil

    out = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if p.name().startswith("flexemr-emb"):
                out[p.name()] = p.pid
        except psutil.NoSuchProcess:
            continue
    return out


class Load:
    """A client thread cycling through the reference cases, every answer checked; failures kept."""

    def __init__(self, socket_path: str, answers: dict) -> None:
        self.socket_path = socket_path
        self.cases = answers["cases"]
        self.stop = threading.Event()
        self.ok = 0
        self.wrong: list[str] = []
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)

    def _run(self) -> None:
        from flexemr.client import InferenceClient

        with InferenceClient(self.socket_path, timeout=60) as c:
            i = 0
            while not self.stop.is_set():
                case = self.cases[i % len(self.cases)]
                i += 1
                try:
                    if i % 2:
                        pooled = c.lookup(case["sparse"])
                        good = sorted(pooled) == sorted(case["lookup"]) and all(
                            np.allclose(pooled[n], w, rtol=1e-5, atol=1e-6) for n, w in case["lookup"].items())
                    else:
                        good = np.allclose(c.predict(case["dense"], case["sparse"]), case["predict"],
                                           rtol=1e-5, atol=1e-6)
                except Exception as e:  # every failed request is a finding: it must name the server
                    self.failures.append(repr(e))
                    continue
                if good:
                    self.ok += 1
                else:
                    self.wrong.append(f"case {i % len(self.cases)}")

    def wait_ok(self, more: int, timeout: float, log: Path) -> None:
        target = self.ok + more
        deadline = time.monotonic() + timeout
        while self.ok < target and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.1)
        assert self.ok >= target, (f"only {self.ok} of {target} answers in {timeout:g} s; failures: "
                                   f"{self.failures[-3:]}\n{log.read_text()[-3000:]}")


def wait_for(what: str, cond, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def test_a_server_whose_queue_pairs_break_is_reconnected_over_rdma_and_nothing_is_lost(cluster, answers) -> None:
    log = cluster["log"]
    server = server_pids(cluster["proc"])["flexemr-emb[1]"]
    data_qps = len(re.findall(r"over RDMA \(data QP", log.read_text()))
    reconnects = log.read_text().count("re-established")
    with Load(cluster["socket"], answers) as load:
        load.wait_ok(6, 300, log)
        os.kill(server, signal.SIGUSR2)
        wait_for("the test hook broke server 1's QPs",
                 lambda: "test hook: forced" in log.read_text(), 120, log)
        assert "forced 0 " not in log.read_text(), "server 1 served no RDMA data connection"
        # The engine owning the connection to server 1 loses it and opens a new one: a new QP, RDMA again.
        wait_for("the connection to server 1 was re-established",
                 lambda: log.read_text().count("re-established") > reconnects, 300, log)
        load.wait_ok(10, 300, log)
    text = log.read_text()
    assert len(re.findall(r"over RDMA \(data QP", text)) > data_qps, "the new connection is RDMA too"
    assert load.wrong == [], load.wrong
    # What was in flight on the broken QPs (or queued for server 1 while it was down) failed
    # naming the server: there is no replica to re-issue it to.
    assert all("server 1" in f for f in load.failures), load.failures[:3]
    assert server_pids(cluster["proc"])["flexemr-emb[1]"] == server, "recovered without a restart"


def test_a_killed_server_is_restarted_and_served_over_rdma_again_exactly(cluster, answers, rdma_device) -> None:
    log = cluster["log"]
    old = server_pids(cluster["proc"])["flexemr-emb[2]"]
    opened = log.read_text().count(f"RDMA on {rdma_device} port 1 gid")
    reconnects = log.read_text().count("re-established")
    with Load(cluster["socket"], answers) as load:
        load.wait_ok(6, 300, log)
        os.kill(old, signal.SIGKILL)
        wait_for("the supervisor restarted server 2",
                 lambda: server_pids(cluster["proc"]).get("flexemr-emb[2]", old) != old, 300, log)
        wait_for("the connection to the new server 2 was re-established",
                 lambda: log.read_text().count("re-established") > reconnects, BOOT_S, log)
        load.wait_ok(10, 300, log)
    text = log.read_text()
    assert text.count(f"RDMA on {rdma_device} port 1 gid") > opened, "the new server opened the device"
    assert load.wrong == [], load.wrong
    assert all("server 2" in f for f in load.failures), load.failures[:3]
