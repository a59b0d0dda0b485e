"""Two rankers sharing two embedding hosts, each a ``flexemrd run`` daemon: what the embedding hosts show.

``emrctl --instance <embedding host> status --json`` lists both rankers on
each host (the human form fits 100 columns); a ranker restarted under a new
token replaces its old entry and its old credit pools are pruned; stopping
the embedding daemons leaves nothing in /dev/shm.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import numpy as np

from flexemr import naming
from flexemr.client import InferenceClient
from flexemr.monolithic import MonolithicModel
from flexemr.reqgen import RequestGenerator

from tests.conftest import REPO
from tests.helpers.daemons import Daemon, free_port


def _status(instance: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emrctl", "--instance", instance, "status", *extra],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def _rankers(instance: str) -> tuple[dict, dict[str, dict]]:
    r = _status(instance, "--json")
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)
    [server] = snap["servers"]
    return server, {x["token"].rsplit(".", 2)[0]: x for x in server["rankers"]}


def _wait_rankers(instance: str, want: dict[str, int | None], timeout: float = 60,
                  served: bool = False) -> tuple[dict, dict]:
    """Until the host lists exactly the ranker instances in ``want`` (with that many connections, if given;
    with ``served``, once it published lookups of each: it publishes about once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        server, rankers = _rankers(instance)
        if (set(rankers) == set(want) and all(n is None or rankers[k]["connections"] == n for k, n in want.items())
                and (not served or all(r["lookups"] > 0 for r in rankers.values()))):
            return server, rankers
        assert time.monotonic() < deadline, f"{instance}: wanted {want}, status shows {server}"
        time.sleep(0.5)


def _exact(sock: str, reference: MonolithicModel, seed: int) -> None:
    gen = RequestGenerator(reference.spec, ids_per_bag=5, seed=seed)
    with InferenceClient(sock, timeout=30) as c:
        for _ in range(3):
            dense, sparse = gen.batch(16)
            np.testing.assert_allclose(c.predict(dense, sparse), reference.predict(dense, sparse),
                                       rtol=1e-5, atol=1e-6)


def test_two_rankers_on_two_embedding_hosts_show_up_and_a_restart_prunes_the_old_pools(tiny_model, tmp_path):
    inst = "t" + uuid.uuid4().hex[:8]
    ports = [free_port() for _ in range(2)]
    emb_inst = [f"{inst}e{i}" for i in range(2)]
    emb = []
    for i, port in enumerate(ports):
        cfg = tmp_path / f"embedding{i}.toml"
        cfg.write_text(f'[daemon]\nrole = "embedding"\ninstance = "{emb_inst[i]}"\nmodel = "{tiny_model}"\n'
                       f'heartbeat_timeout_s = 30\n'
                       f'[embedding]\nlisten = "127.0.0.1:{port}"\nindex = {i}\nservers = 2\n')
        emb.append(Daemon(cfg, tmp_path / f"embedding{i}.log"))
    rankers, socks = [], []
    for k in range(2):
        sock = tmp_path / f"r{k}.sock"
        cfg = tmp_path / f"ranker{k}.toml"
        cfg.write_text(f'[daemon]\nrole = "ranker"\ninstance = "{inst}r{k}"\nmodel = "{tiny_model}"\n'
                       f'heartbeat_timeout_s = 30\n'
                       f'[ranker]\nsocket = "{sock}"\nengines = 1\nrebalance = false\nmetrics_port = 0\n'
                       f'servers = ["127.0.0.1:{ports[0]}", "127.0.0.1:{ports[1]}"]\n[cache]\npolicy = "off"\n')
        rankers.append(Daemon(cfg, tmp_path / f"ranker{k}.log"))
        socks.append(str(sock))
    reference = MonolithicModel(tiny_model)
    try:
        for d in emb + rankers:
            d.start()
        for s in socks:
            _exact(s, reference, seed=1)
        names = [f"{inst}r0", f"{inst}r1"]
        for e in emb_inst:
            server, listed = _wait_rankers(e, {n: None for n in names}, served=True)
            assert server["state"] == "serving" and server["lookups"] > 0
            for n in names:
                r = listed[n]
                assert r["address"] == "127.0.0.1" and r["lookups"] > 0 and r["bytes_in"] > 0
                assert r["bytes_out"] > 0 and r["channels"] >= r["connections"] >= 1
            assert server["pools"] == sum(r["connections"] for r in listed.values())
            human = _status(e)
            assert human.returncode == 0, human.stderr
            assert all(len(line) <= 100 for line in human.stdout.splitlines()), human.stdout
            for n in names:     # the token's tail (pid and run) is what tells two runs apart
                assert listed[n]["token"][-12:] in human.stdout and n[:10] in human.stdout, human.stdout
        # Ranker 0 restarts (a new run, a new token): its old entry and pools go, ranker 1 is untouched.
        _, before = _rankers(emb_inst[0])
        old_token, kept = before[names[0]]["token"], before[names[1]]
        rankers[0].stop()
        for e in emb_inst:
            _wait_rankers(e, {names[1]: kept["connections"]})
        rankers[0].start()
        _exact(socks[0], reference, seed=2)
        _exact(socks[1], reference, seed=3)
        for e in emb_inst:
            server, listed = _wait_rankers(e, {n: None for n in names})
            assert listed[names[0]]["token"] != old_token
            assert server["pools"] == sum(r["connections"] for r in listed.values())
        assert _rankers(emb_inst[0])[1][names[1]]["token"] == kept["token"]
    finally:
        for d in rankers + emb:
            d.stop()
    for e in emb_inst:
        assert naming.list_instance_segments(e) == [], f"{e} left {naming.list_instance_segments(e)} in /dev/shm"
        r = _status(e, "--json")
        assert r.returncode == 2 and "not running" in r.stderr
    for k in range(2):
        naming.unlink_instance_segments(f"{inst}r{k}")
