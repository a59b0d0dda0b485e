"""Cache fills by one-sided RDMA READ in ``flexemrd local --transport rdma`` (2 servers, 2 engines).

The ranker's cache runs with the fixed policy, so every batch's misses are
fetched for the cache after it, deterministically.  Over RDMA the engines
READ those rows from the servers' registered table memory instead of
sending FETCH frames: every answer stays exactly the monolithic reference's
(the second pass over the requests is served partly from the filled cache),
the servers answer no FETCH at all (their STATS counter stays 0) while the
engines report rows read by RDMA READ, and the logs say ``cache fills of
...: RDMA READ`` for every shard.  If fills silently went by FETCH frames,
the servers' counter would move and the engines would report no READ rows.
"""

from __future__ import annotations

import re
import socket
import sys

import numpy as np
import pytest

from tests.rdma.daemon import BOOT_S, engine_status, rdma_cluster

# The module's cluster boots inside this test's setup: on a loaded host that alone took 472 s,
# past the suite's 600 s per-test limit.
pytestmark = [pytest.mark.rdma, pytest.mark.timeout(int(BOOT_S) + 900)]
CASES = 24                   # requests per pass (each a lookup and a predict), two passes


@pytest.fixture(scope="module")
def cluster(answers, tmp_path_factory, rdma_device):
    with rdma_cluster(answers["model"], tmp_path_factory.mktemp("cluster"), servers=2, engines=2, prefix="rr",
                      args=("--cache-policy", "fixed", "--cache-size", "2MiB")) as c:
        yield c


def server_stats(address: str, instance: str) -> dict[str, int]:
    """One embedding server's STATS counters (authenticated with the instance's secret)."""
    from flexemr import naming
    from flexemr.auth import load_secret
    from flexemr.wire import codec
    from flexemr.wire.frame import FrameType, pack_header
    from flexemr.wire.handshake import client_hello
    from flexemr.wire.stream import FrameReader, send_buffers

    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        reader = FrameReader(s)
        client_hello(lambda f: send_buffers(s, f), reader.read_frame, address, codec.ROLE_CLIENT,
                     "test-read/stats", secret=load_secret(naming.local_secret_path(instance)))
        send_buffers(s, [pack_header(FrameType.STATS, 1, 0)])
        h, payload = reader.read_frame()
        assert h.type == FrameType.STATS_RESP, h
        return codec.decode_stats(payload)


def retried(call, failures: list[str]):
    """``call()``, again after a failure naming an embedding server (a connection lost and re-established).

    On a 2-core host loaded by other guests the emulated guest stalls for
    seconds at a time, long enough for a loopback TCP control socket's 3 s
    user timeout: the engine reconnects (a new QP, a new advertisement) and
    what was in flight fails naming the server.  That is the daemon's
    documented behaviour, not a wrong answer; a wrong answer still fails.
    """
    from flexemr.errors import RemoteError

    for attempt in range(3):
        try:
            return call()
        except RemoteError as e:
            assert "server" in str(e), e
            failures.append(str(e))
            if attempt == 2:
                raise


def test_cache_fills_go_by_rdma_read_and_the_servers_answer_no_fetch(cluster, answers) -> None:
    from flexemr.client import InferenceClient

    log = cluster["log"]
    failures: list[str] = []
    with InferenceClient(cluster["socket"], timeout=120) as c:
        for _ in range(2):    # the second pass meets rows the first one's fills put in the cache
            for case in answers["cases"][:CASES]:
                pooled = retried(lambda: c.lookup(case["sparse"]), failures)
                assert sorted(pooled) == sorted(case["lookup"])
                for name, want in case["lookup"].items():
                    np.testing.assert_allclose(pooled[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
                np.testing.assert_allclose(retried(lambda: c.predict(case["dense"], case["sparse"]), failures),
                                           case["predict"], rtol=1e-5, atol=1e-6)
    print(f"{len(failures)} requests failed naming a server and were retried: {failures[:2]}", file=sys.stderr)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    # Every shard of both servers was registered for READ (the tiny model: 4 tables, each on some server).
    registered = re.findall(r"cache fills of (\S+): RDMA READ \(rows", text)
    assert len(registered) >= 4, text[-3000:]
    assert not re.search(r"cache fills of \S+: FETCH frames", text), "no shard fell back to FETCH frames"
    assert "cache fills on connection" in text and ": RDMA READ (" in text
    assert "FETCH frames (" not in text, [ln for ln in text.splitlines() if "FETCH frames (" in ln][:3]
    summaries = [(int(n), int(rows)) for n, rows in
                 re.findall(r"cache fills so far: (\d+) by RDMA READ \((\d+) rows", text)]
    assert summaries and max(r for _, r in summaries) > 0, "the engines read rows by RDMA READ"
    engines = engine_status(cluster["instance"])   # and emrctl status says so
    assert sum(e["fills_read"] for e in engines) > 0 and sum(e["rows_read"] for e in engines) > 0, engines
    addresses = sorted(set(re.findall(r"connection \d+ to (\S+:\d+) over RDMA \(data QP", text)))
    assert len(addresses) == 2, addresses
    for address in addresses:
        stats = server_stats(address, cluster["instance"])
        assert stats["lookups"] > 0, stats
        assert stats["fetches"] == 0, f"{address} answered {stats['fetches']} FETCH frames: fills did not go by READ"
