"""``flexemrd local --transport shm`` keeps every guarantee of TCP, and really runs over shared memory.

Each test first checks that the shm path is the one in use: no TCP socket in
any engine or embedding server process (psutil), the connections' ring
segments in /dev/shm while serving, and a "transport shm" log line per
connection; a silent fallback to TCP fails them.  Then: exact answers for
every pooling mode (the tiny preset has sum, mean and max tables) against the
numpy/monolithic references, migration under load with no failed request,
both credit modes, a kill -9 of a server recovered by the engines' reconnect
path, and nothing left in /dev/shm after SIGTERM.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest

from flexemr import naming
from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.model.tables import open_tables
from flexemr.monolithic import MonolithicModel
from flexemr.pooling import pool_reference
from flexemr.reqgen import RequestGenerator
from tests.conftest import LocalCluster
from tests.helpers.load import ClientLoad

pytestmark = pytest.mark.timeout(900)

SERVERS = 2
# connections (one per server) x (data + credit channel) x (request + response ring)
RINGS_WITH_CREDIT_CHANNEL = SERVERS * 2 * 2
RINGS_INBAND = SERVERS * 2


@pytest.fixture(scope="module")
def reference(tiny_model):
    return MonolithicModel(tiny_model)


@pytest.fixture(scope="module")
def shm(tiny_model, tmp_path_factory):
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("shm"), servers=SERVERS, engines=2,
                     extra=["--transport", "shm", "--no-rebalance"])
    yield c
    c.stop()


def _inet(p: psutil.Process) -> list:
    get = getattr(p, "net_connections", None) or p.connections
    return [x for x in get(kind="inet")]


def ring_segments(instance: str) -> list[str]:
    return [e for e in naming.list_instance_segments(instance)
            if ".shm.s" in e and not e.startswith(naming.SEM_FILE_PREFIX)]


def assert_over_shm(c: LocalCluster, rings: int = RINGS_WITH_CREDIT_CHANNEL) -> None:
    """The data path runs over shm: no TCP anywhere between engines and servers, the rings exist."""
    engines, servers = c.processes("flexemr-eng"), c.processes("flexemr-emb")
    assert len(engines) == 2 and len(servers) == SERVERS, [p.name() for p in engines + servers]
    for p in engines + servers:
        assert _inet(p) == [], f"{p.name()} has TCP sockets: {_inet(p)}"
    segs = ring_segments(c.instance)
    assert len(segs) == rings, segs
    assert all(s.endswith((".req", ".rsp")) for s in segs), segs
    log = c.logs()
    assert "transport tcp" not in log
    assert log.count(": transport shm") >= rings // 2, "every connection logs its transport"


def _exact_lookup(spec, tables, got, sparse) -> bool:
    for t in spec.tables:
        v, ln = sparse[t.name]
        if not np.allclose(got[t.name], pool_reference(tables[t.name], v, ln, t.pooling), rtol=1e-5, atol=1e-5):
            return False
    return True


class Load(ClientLoad):
    """Clients alternating predict and lookup, every answer checked; failures kept."""

    def __init__(self, c: LocalCluster, tiny_model, reference: MonolithicModel, clients: int = 3) -> None:
        super().__init__(clients, context=lambda: c.logs()[-3000:])
        self.c, self.reference = c, reference
        self.spec = load_spec(tiny_model)
        self.tables = open_tables(tiny_model, self.spec)
        self.failures: list[str] = []

    def _run(self, k: int) -> None:
        gen = RequestGenerator(self.spec, ids_per_bag=6, zipf_exponent=1.05, seed=500 + k)
        rng = np.random.default_rng(k)
        with InferenceClient(self.c.socket, timeout=30) as cl:
            i = 0
            while not self.stop.is_set():
                dense, sparse = gen.batch(int(rng.choice([1, 7, 64, 300])))
                i += 1
                try:
                    if i % 2:
                        good = np.allclose(cl.predict(dense, sparse), self.reference.predict(dense, sparse),
                                           rtol=1e-5, atol=1e-6)
                    else:
                        good = _exact_lookup(self.spec, self.tables, cl.lookup(sparse), sparse)
                except Exception as e:   # every failed request is a finding
                    self.failed(repr(e))
                    continue
                self.answered(good)


def test_exact_answers_for_every_pooling_mode_over_shm(shm, tiny_model, reference):
    assert_over_shm(shm)
    spec = load_spec(tiny_model)
    assert {t.pooling.name for t in spec.tables} == {"SUM", "MEAN", "MAX"}
    with Load(shm, tiny_model, reference, clients=4) as load:
        load.wait_ok(300, timeout=120)
        assert_over_shm(shm)      # while serving
    assert load.failures == [] and load.wrong == 0, load.failures[:3]


def test_migration_under_load_fails_no_request(shm, tiny_model, reference):
    from emrctl.client import DaemonClient
    from flexemr.control.commands import Migrate

    with Load(shm, tiny_model, reference) as load:
        load.wait_ok(20)
        moves = 0
        with DaemonClient(shm.instance, timeout=30) as ctl:
            for i in range(40):
                cid = i % SERVERS
                ctl.send(Migrate(conn=cid, to_engine=(i // SERVERS + 1 + cid) % 2))
                moves += 1
                time.sleep(0.02)
        load.wait_ok(50)
    assert moves == 40
    assert load.failures == [] and load.wrong == 0, load.failures[:3]
    assert "adopted, transport shm" in shm.logs()
    assert_over_shm(shm)   # no reconnects: the same rings moved with their sockets


def test_killed_server_is_recovered_and_exact_again(shm, tiny_model, reference):
    servers = {p.name(): p.pid for p in shm.processes("flexemr-emb")}
    old = servers["flexemr-emb[1]"]
    with Load(shm, tiny_model, reference) as load:
        load.wait_ok(20)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = {p.name(): p.pid for p in shm.processes("flexemr-emb")}
            if now.get("flexemr-emb[1]", old) != old:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("server 1 was not restarted:\n" + shm.logs()[-3000:])
        deadline = time.monotonic() + 120
        while "re-established" not in shm.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "re-established" in shm.logs(), shm.logs()[-3000:]
        before = len(load.failures)
        load.wait_ok(100, timeout=120)
    assert load.wrong == 0
    # Requests in flight to the dead server may fail (no replicas), none after the reconnect
    # except the few already queued for it.
    assert all("server 1" in f for f in load.failures[:before]), load.failures[:3]
    # The dead server's rings were unlinked by its successor: exactly the live connections' rings remain.
    assert_over_shm(shm)


def test_sigterm_leaves_nothing_in_dev_shm(shm):
    assert ring_segments(shm.instance)
    shm.proc.send_signal(signal.SIGTERM)
    assert shm.proc.wait(60) == 0, shm.logs()[-3000:]
    assert naming.list_instance_segments(shm.instance) == []


def test_inband_credits_over_shm_are_exact(tiny_model, reference, tmp_path):
    c = LocalCluster(tiny_model, tmp_path, servers=SERVERS, engines=2,
                     extra=["--transport", "shm", "--credits", "inband"])
    try:
        assert_over_shm(c, rings=RINGS_INBAND)
        with Load(c, tiny_model, reference) as load:
            load.wait_ok(200, timeout=120)
        assert load.failures == [] and load.wrong == 0, load.failures[:3]
    finally:
        c.stop()
    assert naming.list_instance_segments(c.instance) == []


def test_tcp_is_still_there_when_asked_for(tiny_model, reference, tmp_path):
    """The comparison baseline: --transport tcp really uses TCP (and so the checks above can tell them apart)."""
    c = LocalCluster(tiny_model, tmp_path, servers=SERVERS, engines=2, extra=["--transport", "tcp"])
    try:
        assert ring_segments(c.instance) == []
        assert any(_inet(p) for p in c.processes("flexemr-eng"))
        with Load(c, tiny_model, reference) as load:
            load.wait_ok(50, timeout=120)
        assert load.failures == [] and load.wrong == 0
    finally:
        c.stop()
