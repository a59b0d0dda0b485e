"""Clients that announce much and send little: memory stays bounded, good clients keep being served.

The acceptance case of issue 11: 100 connections on the ranker's unix socket
each announce a huge frame (1 GiB, and the largest the ranker accepts) and
stall; no process of the cluster grows by more than 64 MiB (RSS), a good
client's answers stay exact and fast, and the stalled clients are
disconnected after ``--client-idle-timeout``.  Also: one client over
``--max-clients`` gets ERROR OVERLOADED.
"""

from __future__ import annotations

import socket
import statistics
import time

import numpy as np
import psutil
import pytest

from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, ErrorCode, FrameType, pack_header, unpack_header

from tests.conftest import LocalCluster
from tests.helpers.sockets import recv_exact

IDLE_TIMEOUT_S = 20.0
MAX_CLIENTS = 120


@pytest.fixture(scope="module")
def hostile_cluster(tiny_model, tmp_path_factory):
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("hostile"), servers=2, engines=1,
                     extra=["--client-idle-timeout", str(IDLE_TIMEOUT_S), "--max-clients", str(MAX_CLIENTS)])
    yield c
    c.stop()


def cluster_rss(c: LocalCluster) -> dict[int, int]:
    procs = [psutil.Process(c.proc.pid), *psutil.Process(c.proc.pid).children(recursive=True)]
    return {p.pid: p.memory_info().rss for p in procs}


def good_requests(model) -> list[tuple[np.ndarray, dict]]:
    spec = load_spec(model)
    rng = np.random.default_rng(3)
    out = []
    for _ in range(4):
        sparse = {}
        for t in spec.tables:
            lengths = rng.integers(0, 4, size=8).astype(np.int32)
            sparse[t.name] = (rng.integers(0, t.rows, size=int(lengths.sum())).astype(np.int64), lengths)
        out.append((rng.standard_normal((8, spec.dense_features)).astype(np.float32), sparse))
    return out


def timed_answers(client: InferenceClient, reqs, rounds: int) -> tuple[list[np.ndarray], float]:
    answers, lat = [], []
    for _ in range(rounds):
        for dense, sparse in reqs:
            t0 = time.perf_counter()
            answers.append(client.predict(dense, sparse))
            lat.append(time.perf_counter() - t0)
    return answers, statistics.median(lat)


def test_stalled_huge_frames_cost_no_memory_and_good_clients_stay_exact(hostile_cluster, tiny_model):
    c = hostile_cluster
    reqs = good_requests(tiny_model)
    with InferenceClient(c.socket) as good:
        expected, base_p50 = timed_answers(good, reqs, 5)
        before = cluster_rss(c)
        stalls = []
        for i in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(c.socket)
            # Half announce 1 GiB (over [ranker].max_request_bytes: refused, then discarded as it
            # arrives); half the largest frame the ranker accepts, and send 256 KiB of it.
            if i % 2:
                s.sendall(pack_header(FrameType.PREDICT, 1000 + i, 1 << 30))
            else:
                s.sendall(pack_header(FrameType.PREDICT, 1000 + i, 256 << 20) + bytes(256 << 10))
            stalls.append(s)
        time.sleep(2.0)
        grown = {pid: cluster_rss(c).get(pid, 0) - rss for pid, rss in before.items()}
        got, stalled_p50 = timed_answers(good, reqs, 5)
        assert max(grown.values()) < 64 << 20, {pid: g >> 20 for pid, g in grown.items()}
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
        assert stalled_p50 < 3 * base_p50 + 0.05, (base_p50, stalled_p50)
        # The 1 GiB announcements were answered TOO_LARGE at once.
        for s in stalls[1::2]:
            s.settimeout(5)
            h = unpack_header(recv_exact(s, HEADER_SIZE), 1 << 20)
            assert h.type == FrameType.ERROR and h.aux == ErrorCode.TOO_LARGE and h.request_id >= 1000
            recv_exact(s, h.payload_len)
        # Slow senders are cut off after the idle timeout; the good client is not (it finishes its frames).
        time.sleep(IDLE_TIMEOUT_S + 2)
        for s in stalls:
            s.settimeout(5)
            try:
                assert s.recv(1 << 16) == b""
            except ConnectionResetError:
                pass
            s.close()
        got, _ = timed_answers(good, reqs, 1)
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
    assert "Traceback" not in c.logs()
    assert "disconnected" in c.logs() and "client_idle_timeout_s" in c.logs()


def test_one_client_over_max_clients_is_told_overloaded(hostile_cluster, tiny_model):
    c = hostile_cluster
    held = []
    try:
        for _ in range(MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(c.socket)
            held.append(s)
        time.sleep(1.0)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.connect(c.socket)
        extra.settimeout(10)
        h = unpack_header(recv_exact(extra, HEADER_SIZE), 1 << 20)
        assert h.type == FrameType.ERROR and h.aux == ErrorCode.OVERLOADED
        assert "max_clients" in codec.decode_error(recv_exact(extra, h.payload_len))
        extra.close()
    finally:
        for s in held:
            s.close()
    time.sleep(1.0)
    reqs = good_requests(tiny_model)
    with InferenceClient(c.socket) as good:   # the slots come back
        timed_answers(good, reqs, 1)
