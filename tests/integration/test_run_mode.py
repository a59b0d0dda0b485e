"""``flexemrd run`` per host: embedding hosts and a ranker as separate daemons, and an embedding host's outage.

Stopping an embedding host and then killing one of the ranker's engines must
leave the ranker up (the restarted engine boots degraded instead of halting
the daemon with a boot error); it serves again, exactly, once the host is back.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
import pytest

from flexemr.client import InferenceClient
from flexemr.errors import RemoteError
from flexemr.monolithic import MonolithicModel
from flexemr.reqgen import RequestGenerator

from tests.helpers.daemons import Daemon, free_port, named_children


@pytest.fixture(scope="module")
def hosts(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runmode")
    inst = "t" + uuid.uuid4().hex[:8]
    ports = [free_port() for _ in range(2)]
    emb = []
    for i, port in enumerate(ports):
        cfg = tmp / f"embedding{i}.toml"
        cfg.write_text(f'[daemon]\nrole = "embedding"\ninstance = "{inst}e{i}"\nmodel = "{tiny_model}"\n'
                       f'heartbeat_timeout_s = 30\n'
                       f'[embedding]\nlisten = "127.0.0.1:{port}"\nindex = {i}\nservers = 2\n')
        emb.append(Daemon(cfg, tmp / f"embedding{i}.log"))
    sock = tmp / "ranker.sock"
    rcfg = tmp / "ranker.toml"
    rcfg.write_text(f'[daemon]\nrole = "ranker"\ninstance = "{inst}r"\nmodel = "{tiny_model}"\n'
                    f'heartbeat_timeout_s = 30\n'
                    f'[ranker]\nsocket = "{sock}"\nengines = 2\nrebalance = false\nmetrics_port = 0\n'
                    f'servers = ["127.0.0.1:{ports[0]}", "127.0.0.1:{ports[1]}"]\n[cache]\npolicy = "off"\n')
    ranker = Daemon(rcfg, tmp / "ranker.log")
    for d in emb:
        d.start()
    ranker.start()
    yield emb, ranker, str(sock)
    for d in [ranker, *emb]:
        d.stop()
    from flexemr import naming

    for name in (f"{inst}r", f"{inst}e0", f"{inst}e1"):
        naming.unlink_instance_segments(name)


def _engine_pids(ranker: Daemon) -> list[int]:
    return [p.pid for p in named_children(ranker.proc.pid, "flexemr-eng[")]


def _exact(sock: str, reference: MonolithicModel, seed: int, tries: int = 1) -> bool:
    gen = RequestGenerator(reference.spec, ids_per_bag=5, seed=seed)
    with InferenceClient(sock, timeout=20) as c:
        for _ in range(tries):
            dense, sparse = gen.batch(16)
            got = c.predict(dense, sparse)
            if not np.allclose(got, reference.predict(dense, sparse), rtol=1e-5, atol=1e-6):
                return False
    return True


def test_an_embedding_host_outage_and_an_engine_kill_leave_the_ranker_up(hosts, tiny_model):
    emb, ranker, sock = hosts
    reference = MonolithicModel(tiny_model)
    assert _exact(sock, reference, seed=1, tries=5)
    emb[1].stop()
    engine = _engine_pids(ranker)[0]
    os.kill(engine, signal.SIGKILL)
    # While the host is down: the ranker stays up and answers at once with an error naming the server.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (set(_engine_pids(ranker)) & {engine} or len(_engine_pids(ranker)) < 2):
        time.sleep(0.1)
    time.sleep(1.0)
    assert ranker.proc.poll() is None, ranker.log.read_text()[-3000:]
    gen = RequestGenerator(reference.spec, ids_per_bag=5, seed=2)
    with InferenceClient(sock, timeout=20) as c:
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="server 1"):
            c.predict(*gen.batch(4))
        assert time.monotonic() - t0 < 2.0
    # The host returns: serving is back, exact.
    emb[1].start()
    deadline = time.monotonic() + 60
    while True:
        try:
            if _exact(sock, reference, seed=3, tries=3):
                break
        except RemoteError:
            pass
        assert time.monotonic() < deadline, ranker.log.read_text()[-3000:]
        time.sleep(0.5)
    assert ranker.proc.poll() is None
    assert "exit 3" not in ranker.log.read_text()
