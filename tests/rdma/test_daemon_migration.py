"""Live migration over RDMA: a connection moves between engines every 0.5 s under load, no request fails.

A queue pair cannot change process, so ``flexemrd local --transport rdma``
migrates by reopening (``[ranker].migration = "auto"``): the new engine opens
its own QPs to the server, the ranker routes there once they are ready, the
old engine drains its answers and closes its own.  One cluster (2 embedding
servers, 2 engines); connection 0 moves back and forth through the control
mailbox (the command emrctl and the rebalancer use; the next one 0.5 s after
the previous one started, or as soon as it is confirmed where a reopen takes
longer, as on the emulated guest CPU) while two closed-loop
clients compare every lookup() with the monolithic reference made on the host
(tests/rdma/reference.py).  Checked: no failed or wrong answer, the engines
are the ones that started, each move opened new QPs (the log names them) and
the connection count returns to one per server and channel (nothing leaks),
and the transport in use is rdma (the log's device lines, the device's packet
counters), so replacing verbs by TCP fails the test.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

import numpy as np
import pytest

from tests.rdma.daemon import rdma_cluster
from tests.rdma.peers import counter

pytestmark = pytest.mark.rdma

SERVERS = 2
ENGINES = 2
CHANNELS = 2            # data + credit QP per connection, each with its TCP control socket
PERIOD_S = 0.5
DURATION_S = 10.0
# On the emulated guest CPU one reopen (two QPs, their HELLOs) takes seconds, so the next
# move starts as soon as the previous one is confirmed, and the test keeps moving until it
# made MIN_MOVES (there and back, twice) even past DURATION_S, within MAX_S.
MIN_MOVES = 4
MAX_S = 300.0
CLIENTS = 2


@pytest.fixture(scope="module")
def cluster(answers, tmp_path_factory, rdma_device):
    with rdma_cluster(answers["model"], tmp_path_factory.mktemp("cluster"), servers=SERVERS, engines=ENGINES,
                      prefix="m") as c:
        yield c


def _engines(proc: subprocess.Popen) -> list:
    import psutil

    return sorted((p for p in psutil.Process(proc.pid).children() if p.name().startswith("flexemr-eng")),
                  key=lambda p: p.pid)


def _engine_channels(proc: subprocess.Popen) -> int:
    """Connections from the engines to the servers: an RDMA connection keeps its TCP socket as control channel."""
    import psutil

    return sum(1 for p in _engines(proc) for s in p.net_connections(kind="tcp")
               if s.status == psutil.CONN_ESTABLISHED and s.raddr)


def test_a_migration_every_half_second_over_rdma_fails_no_request(cluster, answers, rdma_device) -> None:
    from emrctl.client import CommandFailed, DaemonClient
    from flexemr.client import InferenceClient
    from flexemr.control.commands import Migrate

    proc = cluster["proc"]
    pids = [p.pid for p in _engines(proc)]
    assert len(pids) == ENGINES
    assert _engine_channels(proc) == SERVERS * CHANNELS
    pkts0 = counter(rdma_device, "rcvd_pkts")
    cases = answers["cases"]
    stop = threading.Event()
    failures: list[str] = []
    answered = [0] * CLIENTS

    def client(k: int) -> None:
        with InferenceClient(cluster["socket"], timeout=120) as c:
            i = k
            while not stop.is_set():
                case = cases[i % len(cases)]
                i += 1
                try:
                    got = c.lookup(case["sparse"])
                except Exception as e:  # every failed request is a finding
                    failures.append(f"client {k}: request failed: {e!r}")
                    continue
                for name, want in case["lookup"].items():
                    if not np.allclose(got[name], want, rtol=1e-5, atol=1e-6):
                        failures.append(f"client {k}: wrong answer for table {name}")
                        break
                answered[k] += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    moves, took_ms = 0, []
    try:
        with DaemonClient(cluster["instance"], timeout=60) as ctl:
            t0 = time.monotonic()
            while sum(answered) == 0 and time.monotonic() - t0 < 120:
                time.sleep(0.1)
            assert sum(answered) > 0, f"no answer before the migrations: {failures[:3]}"
            start = time.monotonic()
            while (time.monotonic() - start < DURATION_S or moves < MIN_MOVES) and not failures \
                    and time.monotonic() - start < MAX_S:
                time.sleep(max(0.0, start + moves * PERIOD_S - time.monotonic()))
                try:
                    res = ctl.send(Migrate(conn=0, to_engine=(moves + 1) % ENGINES))
                except CommandFailed as e:
                    failures.append(f"migration #{moves + 1} failed: {e}")
                    break
                assert res.get("moved"), res
                took_ms.append(res["elapsed_ms"])
                moves += 1
    finally:
        served = sum(answered)
        stop.set()
        for t in threads:
            t.join(180)
    log = cluster["log"].read_text()
    assert failures == [], f"{len(failures)} failures after {moves} moves (took {took_ms} ms), first: " \
                           f"{failures[:3]}\n{log[-3000:]}"
    assert moves >= MIN_MOVES, f"only {moves} migrations in {MAX_S:g} s (took {took_ms} ms)"
    assert served > moves, f"only {served} requests answered during {moves} migrations"
    assert [p.pid for p in _engines(proc)] == pids, "an engine died and was restarted during the migrations"
    deadline = time.monotonic() + 60
    while _engine_channels(proc) != SERVERS * CHANNELS and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _engine_channels(proc) == SERVERS * CHANNELS, "retired connections were not closed"
    # Really verbs: both engines on the device, and every move opened a fresh data and credit QP.
    assert log.count("transport: rdma on") == ENGINES, "both engines chose rdma"
    assert log.count("by reopening it") >= moves, "the connection was not migrated by reopening"
    assert len(re.findall(r"over RDMA \(data QP", log)) >= SERVERS + moves, "each move opened its own data QP"
    assert len(re.findall(r"over RDMA \(credit QP", log)) >= SERVERS + moves
    assert "unanswered on the connection it replaced" not in log, "answers were left behind at a drain"
    assert "Traceback" not in log, log[-3000:]
    assert counter(rdma_device, "rcvd_pkts") - pkts0 >= served, "the answers came over the device"
