"""``flexemrd local --transport rdma``: 3 embedding servers, 2 engines, frames over soft-RoCE.

One cluster for the module (the guest's emulated CPU takes minutes to import
torch in four processes).  Every lookup() and predict() answer equals the
monolithic reference made on the host (tests/rdma/reference.py) for the tiny
model (odd table sizes, every pooling mode); the logs say RDMA on the device
for every engine and server and name each connection's QP; the bytes that
cross TCP in the whole run (HELLOs only) are under 1% of the pooled bytes
served, measured by the kernel (``ss -tin``), so the data went over verbs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.rdma.peers import counter

pytestmark = pytest.mark.rdma

REPO = Path(__file__).resolve().parents[2]
BOOT_S = float(os.environ.get("FLEXEMR_RDMA_BOOT_S", "1200"))


def tcp_bytes() -> int:
    """Bytes sent over every established TCP connection of this host (both ends counted)."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True, check=True).stdout
    return sum(int(m) for m in re.findall(r"bytes_sent:(\d+)", out))


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    from tests.rdma.reference import load, prepare

    made = os.environ.get("FLEXEMR_RDMA_REFERENCE")
    path = Path(made) / "answers.pkl" if made else prepare(tmp_path_factory.mktemp("reference"))
    return load(path)


@pytest.fixture(scope="module")
def cluster(answers, tmp_path_factory, rdma_device):
    tmp = tmp_path_factory.mktemp("cluster")
    instance = "r" + uuid.uuid4().hex[:8]
    sock = str(tmp / "api.sock")
    log = tmp / "cluster.log"
    cmd = [sys.executable, "-m", "flexemrd", "local", "--model", answers["model"], "--embedding-servers", "3",
           "--engines", "2", "--socket", sock, "--instance", instance, "--transport", "rdma", "--no-rebalance",
           "--heartbeat-timeout", "0", "--boot-timeout", str(BOOT_S)]
    tcp0 = tcp_bytes()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, text=True, cwd=REPO)
        deadline = time.monotonic() + BOOT_S + 60
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "ready" in line or not line:
                break
        if "ready" not in line:
            proc.kill()
            pytest.fail(f"flexemrd local --transport rdma did not become ready:\n{log.read_text()[-4000:]}")
        try:
            yield {"socket": sock, "log": log, "tcp0": tcp0, "proc": proc}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            from flexemr import naming

            naming.unlink_instance_segments(instance)


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
    assert counter(rdma_device, "rcvd_pkts") - pkts0 >= 2 * len(answers["cases"])
    assert crossed_tcp < 0.01 * served, f"{crossed_tcp} bytes crossed TCP for {served} bytes served"
