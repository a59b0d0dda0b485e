"""Zero-copy responses over shm: partials are read where the server wrote them, and stay exact.

With ``--transport shm`` a large response (>= enginemsg.REF_MIN_PAYLOAD) is
not copied by the engine into the completion ring: the completion message is
a reference, the inference process reads the partial in the connection's
response ring and gives the space back.  The tests look at the rings' own
counters (shared memory, as emrctl would), so a silent return to copying
fails them:

- every completion message stays reference-sized while the responses are
  large, and the response rings count the same bytes as lent;
- answers are exact (every pooling mode) with lends in flight across
  migrations (a connection's lends then come back through two engines'
  completion rings, out of order) and across a ranker that stops consuming
  for a while (SIGSTOP: nothing fails, nothing deadlocks);
- nothing is left in /dev/shm after SIGTERM.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from flexemr import enginemsg as em
from flexemr import naming
from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.monolithic import MonolithicModel
from flexemr.reqgen import RequestGenerator
from flexemr.ring import Ring
from tests.conftest import LocalCluster
from tests.integration.test_shm_transport import SERVERS, Load, _exact_lookup, assert_over_shm, ring_segments

pytestmark = pytest.mark.timeout(900)

ENGINES = 2
BATCH = 300   # the tiny model's partial for 300 samples is several KiB: always passed by reference


class LargeLoad(Load):
    """``Load`` with large batches only, so every response is one the engine must not copy."""

    def _run(self, k: int) -> None:
        gen = RequestGenerator(self.spec, ids_per_bag=6, zipf_exponent=1.05, seed=900 + k)
        with InferenceClient(self.c.socket, timeout=60) as cl:
            i = 0
            while not self.stop.is_set():
                dense, sparse = gen.batch(BATCH)
                i += 1
                try:
                    if i % 2:
                        good = np.allclose(cl.predict(dense, sparse), self.reference.predict(dense, sparse),
                                           rtol=1e-5, atol=1e-6)
                    else:
                        good = _exact_lookup(self.spec, self.tables, cl.lookup(sparse), sparse)
                except Exception as e:
                    self.failed(repr(e))
                    continue
                self.answered(good)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return MonolithicModel(tiny_model)


@pytest.fixture(scope="module")
def shm(tiny_model, tmp_path_factory):
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("zc"), servers=SERVERS, engines=ENGINES,
                     extra=["--transport", "shm", "--no-rebalance"])
    yield c
    c.stop()


class RingCounters:
    """The completion rings' and data response rings' counters, read from shared memory."""

    def __init__(self, instance: str) -> None:
        self.cmp = [Ring.attach(naming.ring_names(instance, e)[1], populate=False) for e in range(ENGINES)]
        self.rsp = [Ring.attach("/" + s, populate=False) for s in ring_segments(instance) if s.endswith("d.rsp")]
        assert len(self.rsp) == SERVERS, ring_segments(instance)

    def read(self) -> dict[str, int]:
        return {
            "cmp_msgs": sum(r.stats().msgs_written for r in self.cmp),
            "cmp_bytes": sum(r.stats().bytes_written for r in self.cmp),
            "rsp_bytes": sum(r.stats().bytes_written for r in self.rsp),
            "lent": sum(r.lent_bytes() for r in self.rsp),
            "outstanding": sum(r.lends_outstanding() for r in self.rsp),
        }

    def close(self) -> None:
        for r in self.cmp + self.rsp:
            r.close()


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def test_large_responses_are_read_where_they_landed_and_exact(shm, tiny_model, reference):
    assert_over_shm(shm)
    spec = load_spec(tiny_model)
    assert {t.pooling.name for t in spec.tables} == {"SUM", "MEAN", "MAX"}
    rings = RingCounters(shm.instance)
    try:
        before = rings.read()
        with LargeLoad(shm, tiny_model, reference, clients=3) as load:
            load.wait_ok(150, timeout=180)
        time.sleep(0.5)
        d = _delta(rings.read(), before)
    finally:
        rings.close()
    assert load.failures == [] and load.wrong == 0, load.failures[:3]
    assert d["lent"] > 150 * 4096, d
    # what crossed the response rings was lent, except the frame headers and credit grants
    assert d["lent"] >= 0.9 * d["rsp_bytes"], d
    # no payload was copied into a completion ring: every message there is reference-sized
    ref_bytes = em.PREFIX_SIZE + 32 + em.REF_SIZE + 128
    assert d["cmp_bytes"] <= d["cmp_msgs"] * ref_bytes, d
    assert d["cmp_bytes"] < 0.05 * d["lent"], d


def test_migrations_with_lends_in_flight_stay_exact(shm, tiny_model, reference):
    from emrctl.client import DaemonClient
    from flexemr.control.commands import Migrate

    rings = RingCounters(shm.instance)
    try:
        before = rings.read()
        with LargeLoad(shm, tiny_model, reference) as load:
            load.wait_ok(10)
            with DaemonClient(shm.instance, timeout=30) as ctl:
                for i in range(30):
                    cid = i % SERVERS
                    ctl.send(Migrate(conn=cid, to_engine=(i // SERVERS + 1 + cid) % ENGINES))
                    time.sleep(0.03)
            load.wait_ok(40)
        time.sleep(0.5)
        d = _delta(rings.read(), before)
        after = rings.read()
    finally:
        rings.close()
    assert load.failures == [] and load.wrong == 0, load.failures[:3]
    assert "adopted, transport shm" in shm.logs()
    assert d["lent"] > 0, d
    assert after["outstanding"] == 0, "every lend was given back once the load stopped"


def test_a_ranker_that_stops_consuming_for_a_while_fails_nothing(shm, tiny_model, reference):
    inference = shm.processes("flexemr-inf")
    assert len(inference) == 1, [p.name() for p in shm.processes("flexemr")]
    with LargeLoad(shm, tiny_model, reference) as load:
        load.wait_ok(10)
        inference[0].send_signal(signal.SIGSTOP)
        time.sleep(3.0)   # below the heartbeat timeout: stalled, not dead
        inference[0].send_signal(signal.SIGCONT)
        load.wait_ok(30, timeout=120)
    assert load.failures == [] and load.wrong == 0, load.failures[:3]
    assert_over_shm(shm)


def test_sigterm_leaves_nothing_in_dev_shm(shm):
    assert ring_segments(shm.instance)
    shm.proc.send_signal(signal.SIGTERM)
    assert shm.proc.wait(60) == 0, shm.logs()[-3000:]
    assert naming.list_instance_segments(shm.instance) == []
