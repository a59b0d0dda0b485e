"""Live migration over RDMA: a migration started every 0.5 s under load, no request fails.

A queue pair cannot change process, so ``flexemrd local --transport rdma``
migrates by reopening (``[ranker].migration = "auto"``): the new engine opens
its own QPs to the server, the ranker routes there once they are ready, the
old engine drains its answers and closes its own.  On the emulated guest CPU,
loaded, one reopen takes 1-5 s (two QPs, their rings, three HELLO/auth round
trips each through a busy server; docs/RDMA.md has the breakdown), so "a
migration every 0.5 s" here means what the control API allows: moves are
*started* every 0.5 s without waiting for the previous ones
(``Migrate(wait=False)``, as the rebalancer does), each on a different
connection, and each is then confirmed (new connection serving, old one
drained and closed).  One cluster (2 embedding servers, 4 connections to
each, 2 engines); two bursts move all 8 connections to the other engine and
back through the control mailbox while two closed-loop clients compare every
lookup() with the monolithic reference made on the host
(tests/rdma/reference.py).  Checked: no failed or wrong answer, the moves
started 0.5 s apart while earlier ones were under way and all were confirmed,
the engines are the ones that started, each move opened new QPs (the log
names them) and the connection count returns to one per connection and
channel (nothing leaks), and the transport in use is rdma (the log's device
lines, the device's packet counters), so replacing verbs by TCP fails the test.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.overlapping_moves import move_all
from tests.rdma.daemon import rdma_cluster
from tests.rdma.peers import counter

pytestmark = pytest.mark.rdma

SERVERS = 2
CONNS_PER_SERVER = 4    # 8 connections: up to 8 moves under way at once
CONNS = SERVERS * CONNS_PER_SERVER
ENGINES = 2
CHANNELS = 2            # data + credit QP per connection, each with its TCP control socket
PERIOD_S = 0.5
LATE_S = 1.5            # a start may lag its slot on the 0.5 s schedule by this much (a loaded guest)
BURSTS = 2              # every connection to the other engine, then back
CONFIRM_S = 240.0       # for a burst's last moves to be confirmed (emulated CPU, loaded host)
CLIENTS = 2
WARM_ANSWERS = 20       # answers before the first move
_TIMELINE = (r"by reopening it|opened here as|now routed through|retiring:|drained and closed|moved from engine|"
             r"stream for .* ready in")


@pytest.fixture(scope="module")
def cluster(answers, tmp_path_factory, rdma_device):
    with rdma_cluster(answers["model"], tmp_path_factory.mktemp("cluster"), servers=SERVERS, engines=ENGINES,
                      prefix="m", args=("--connections-per-server", str(CONNS_PER_SERVER))) as c:
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


def test_a_migration_started_every_half_second_over_rdma_fails_no_request(cluster, answers, rdma_device) -> None:
    from emrctl.client import DaemonClient
    from flexemr.client import InferenceClient

    proc = cluster["proc"]
    pids = [p.pid for p in _engines(proc)]
    assert len(pids) == ENGINES
    assert _engine_channels(proc) == CONNS * CHANNELS
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
    bursts = []
    try:
        with DaemonClient(cluster["instance"], timeout=60) as ctl:
            # Under steady load, not the ranker's first batches (first-time paths on the emulated CPU).
            t0 = time.monotonic()
            while sum(answered) < WARM_ANSWERS and not failures and time.monotonic() - t0 < 300:
                time.sleep(0.1)
            assert sum(answered) >= WARM_ANSWERS, f"{sum(answered)} answers before the migrations: {failures[:3]}"
            for _ in range(BURSTS):
                owners = ctl.block.runtime.read().owners
                moves = [(cid, (owners[cid] + 1) % ENGINES) for cid in range(CONNS)]
                bursts.append(move_all(ctl, moves, PERIOD_S, CONFIRM_S, give_up=lambda: bool(failures)))
            final = list(ctl.block.runtime.read().owners)
    finally:
        served = sum(answered)
        stop.set()
        for t in threads:
            t.join(180)
    log = cluster["log"].read_text()
    report = "; ".join(b.describe() for b in bursts)
    # Where each move's time went (pytest -s shows it; the guest's files are thrown away).
    print(report, file=sys.stderr)
    print("\n".join(line for line in log.splitlines() if re.search(_TIMELINE, line)), file=sys.stderr)
    moves = sum(len(b.moves) for b in bursts)
    assert failures == [], f"{len(failures)} failures ({report}), first: {failures[:3]}\n{log[-3000:]}"
    assert moves == BURSTS * CONNS, report
    assert all(t is not None for b in bursts for t in b.confirmed), f"a move was never confirmed: {report}"
    # The cadence: each move is asked for on a 0.5 s schedule and started when the supervisor publishes it
    # (it serves the mailbox every TICK_S, 0.2 s, on two emulated vCPUs shared with everything else), so a
    # start may be late, the next one then on time: each within LATE_S of its slot, 0.5 s apart on average.
    for b in bursts:
        assert max(b.late) < LATE_S, f"a move started more than {LATE_S:g} s after its slot: {report}"
        assert (b.started[-1] - b.started[0]) / (len(b.started) - 1) < 1.2 * PERIOD_S, report
    assert all(b.overlapped >= CONNS // 2 for b in bursts), f"the moves did not overlap: {report}"
    assert served > moves, f"only {served} requests answered during {moves} migrations"
    assert final == [(e + 1) % ENGINES for _c, e in bursts[0].moves], f"not back where they started: {report}"
    assert [p.pid for p in _engines(proc)] == pids, "an engine died and was restarted during the migrations"
    deadline = time.monotonic() + 60
    while _engine_channels(proc) != CONNS * CHANNELS and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _engine_channels(proc) == CONNS * CHANNELS, "retired connections were not closed"
    # Really verbs: both engines on the device, and every move opened a fresh data and credit QP.
    assert log.count("transport: rdma on") == ENGINES, "both engines chose rdma"
    assert log.count("by reopening it") >= moves, "the connections were not migrated by reopening"
    assert len(re.findall(r"over RDMA \(data QP", log)) >= CONNS + moves, "each move opened its own data QP"
    assert len(re.findall(r"over RDMA \(credit QP", log)) >= CONNS + moves
    assert "unanswered on the connection it replaced" not in log, "answers were left behind at a drain"
    assert "is not confirmed" not in log
    assert "Traceback" not in log, log[-3000:]
    assert counter(rdma_device, "rcvd_pkts") - pkts0 >= served, "the answers came over the device"
