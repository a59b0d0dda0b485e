"""Fuzz a live ``flexemrd local``: the ranker's unix socket and an embedding server's port.

Each surface gets ``FLEXEMR_FUZZ_FRAMES`` (default 100,000) hostile frames
from several connections at once while a good client checks that its
answers stay bit-for-bit what they were before the fuzzing.  Reported (and
asserted): crashes (a process of the cluster gone), hangs, unanswered
frames, RSS and fd growth of every process.  See tests/fuzz/README.md.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time

import numpy as np
import psutil
import pytest

from flexemr import auth, naming
from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.wire import codec
from flexemr.wire.frame import FrameType

from tests.conftest import LocalCluster
from tests.fuzz.frames import RANKER_TYPES, SERVER_TYPES, FrameFactory, ranker_templates, server_templates
from tests.fuzz.harness import Fuzzer, Tally, growth_report, process_snapshot, read_frame

pytestmark = pytest.mark.slow

FRAMES = int(os.environ.get("FLEXEMR_FUZZ_FRAMES", "100000"))
CONNECTIONS = 4
UNAUTHENTICATED_SHARE = 0.05     # of the embedding surface's frames: pre-auth garbage, one frame per connection


@pytest.fixture(scope="module")
def fuzz_cluster(tiny_model, tmp_path_factory):
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("fuzz"), servers=2, engines=1,
                     extra=["--log-level", "warning", "--transport", "tcp"])   # the servers' network port is a surface
    yield c
    c.stop()


def _server_port(c: LocalCluster) -> int:
    conns = psutil.Process(c.proc.pid).net_connections(kind="tcp")
    return min(k.laddr.port for k in conns if k.status == psutil.CONN_LISTEN)


def _authenticated(port: int, secret: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    name = f"fuzz{threading.get_ident() & 0xFFFF}"
    s.sendall(b"".join(bytes(b) for b in codec.encode_hello(0, codec.ROLE_CLIENT, name)))
    ftype, _aux, payload = read_frame(s)
    assert ftype == FrameType.AUTH_CHALLENGE, ftype
    ch = codec.decode_auth_challenge(payload)
    nonce = auth.new_nonce()
    ident = auth.hello_identity(codec.ROLE_CLIENT, 0, name)
    s.sendall(b"".join(bytes(b) for b in codec.encode_auth_proof(1, nonce,
                                                                 auth.ranker_proof(secret, ch.nonce, nonce, ident))))
    ftype, _aux, payload = read_frame(s)
    assert ftype == FrameType.AUTH_OK, codec.decode_error(payload)
    return s


def _shards(port: int, secret: bytes) -> np.ndarray:
    with _authenticated(port, secret) as s:
        s.sendall(b"".join(bytes(b) for b in codec.encode_hello(2, codec.ROLE_CLIENT, "fuzz-shards")))
        ftype, _aux, payload = read_frame(s)
        assert ftype == FrameType.HELLO
        return codec.decode_hello(payload).shards.copy()


def _report(surface: str, tally: Tally, seconds: float, good: dict, growth) -> str:
    same, rss_max, fd_max, lines = growth
    text = "\n".join([
        f"fuzz {surface}: {tally.sent} frames over {tally.connections} connections in {seconds:.1f} s "
        f"({tally.sent / seconds:.0f}/s); {tally.closes} closing frames",
        f"  answered {tally.answered}, unanswered {tally.unanswered}, hangs {tally.hangs}, "
        f"crashes {0 if same else 'YES'}",
        f"  good client: {good['ok']} exact answers, {good['wrong']} wrong, {good['failed']} failed, "
        f"p50 {good['p50_ms']:.2f} ms (before fuzzing {good['base_p50_ms']:.2f} ms)"
        + (f", max |diff| {good['max_diff']:.2g}" if "max_diff" in good else ""),
        f"  max growth: RSS {rss_max / 2**20:+.1f} MiB, fds {fd_max:+d}",
        *lines, *(f"  problem: {p}" for p in tally.problems)])
    print(text)
    return text


def _run(fuzzers: list, per: int, good_loop, stop: threading.Event) -> float:
    t0 = time.monotonic()
    threads = [threading.Thread(target=f.run, args=(per,), daemon=True) for f in fuzzers]
    g = threading.Thread(target=good_loop, daemon=True)
    g.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    g.join(60)
    return time.monotonic() - t0


def _assert_clean(tally: Tally, good: dict, growth, text: str) -> None:
    same, rss_max, fd_max, _ = growth
    assert same, text
    assert tally.unanswered == 0 and tally.hangs == 0, text
    assert good["wrong"] == 0 and good["failed"] == 0 and good["ok"] > 0, text
    assert rss_max < 64 << 20 and fd_max <= 2, text


def test_fuzz_ranker_unix_socket(fuzz_cluster, tiny_model):
    c = fuzz_cluster
    spec = load_spec(tiny_model)
    templates = ranker_templates(spec)
    rng = np.random.default_rng(11)
    reqs = []
    for _ in range(3):
        sparse = {}
        for t in spec.tables:
            lengths = rng.integers(0, 4, 4).astype(np.int32)
            sparse[t.name] = (rng.integers(0, t.rows, int(lengths.sum())).astype(np.int64), lengths)
        reqs.append((rng.standard_normal((4, spec.dense_features)).astype(np.float32), sparse))
    good = {"ok": 0, "wrong": 0, "failed": 0, "max_diff": 0.0}
    with InferenceClient(c.socket) as cl:
        expected = [cl.predict(d, s) for d, s in reqs]
        t0 = time.perf_counter()
        for d, s in reqs * 5:
            cl.predict(d, s)
        good["base_p50_ms"] = (time.perf_counter() - t0) / 15 * 1e3
    time.sleep(1.0)
    before = process_snapshot(c.proc.pid)
    stop = threading.Event()
    lat: list[float] = []

    def good_loop() -> None:
        with InferenceClient(c.socket) as cl:
            while not stop.is_set():
                for (d, s), want in zip(reqs, expected):
                    t = time.perf_counter()
                    try:
                        got = cl.predict(d, s)
                    except Exception:
                        good["failed"] += 1
                        continue
                    lat.append(time.perf_counter() - t)
                    # Equal up to float32 rounding: the NN's result for a sample may differ in its
                    # last bit with the batch it shares (fuzz PREDICTs join batches too).
                    good["max_diff"] = max(good["max_diff"], float(np.abs(got - want).max()))
                    good["ok" if np.allclose(got, want, rtol=1e-5, atol=1e-6) else "wrong"] += 1
                time.sleep(0.01)

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(c.socket)
        return s

    tally = Tally()
    fuzzers = [Fuzzer(connect, FrameFactory(templates, RANKER_TYPES, 256 << 20, seed=i), tally)
               for i in range(CONNECTIONS)]
    seconds = _run(fuzzers, -(-FRAMES // CONNECTIONS), good_loop, stop)
    time.sleep(2.0)
    growth = growth_report(before, process_snapshot(c.proc.pid))
    good["p50_ms"] = statistics.median(lat) * 1e3 if lat else float("nan")
    text = _report("ranker unix socket", tally, seconds, good, growth)
    assert "Traceback" not in c.logs(), c.logs()[-3000:]
    _assert_clean(tally, good, growth, text)


def test_fuzz_embedding_server_port(fuzz_cluster):
    c = fuzz_cluster
    port = _server_port(c)
    secret = auth.load_secret(naming.local_secret_path(c.instance))
    shards = _shards(port, secret)
    templates = server_templates(shards)
    good_frames = [t for t in templates[:6]]
    good = {"ok": 0, "wrong": 0, "failed": 0}

    def exchange(s: socket.socket, frames: list[bytes]) -> list[bytes]:
        s.sendall(b"".join(frames))
        return [read_frame(s)[2] for _ in frames]

    with _authenticated(port, secret) as s:
        expected = exchange(s, good_frames)
        t0 = time.perf_counter()
        for _ in range(10):
            exchange(s, good_frames)
        good["base_p50_ms"] = (time.perf_counter() - t0) / 10 * 1e3
    time.sleep(1.0)
    before = process_snapshot(c.proc.pid)
    stop = threading.Event()
    lat: list[float] = []

    def good_loop() -> None:
        with _authenticated(port, secret) as s:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    got = exchange(s, good_frames)
                except Exception:
                    good["failed"] += 1
                    return
                lat.append(time.perf_counter() - t)
                good["ok" if got == expected else "wrong"] += 1
                time.sleep(0.01)

    tally = Tally()
    unauth = int(FRAMES * UNAUTHENTICATED_SHARE)
    fuzzers = [Fuzzer(lambda: _authenticated(port, secret), FrameFactory(templates, SERVER_TYPES, 1 << 30, seed=i),
                      tally) for i in range(CONNECTIONS)]
    pre_auth = _UnauthenticatedFuzzer(port, FrameFactory(templates, SERVER_TYPES, 1 << 30, seed=99), tally)
    t_pre = threading.Thread(target=pre_auth.run, args=(unauth,), daemon=True)
    t_pre.start()
    seconds = _run(fuzzers, -(-(FRAMES - unauth) // CONNECTIONS), good_loop, stop)
    t_pre.join()
    time.sleep(2.0)
    growth = growth_report(before, process_snapshot(c.proc.pid))
    good["p50_ms"] = statistics.median(lat) * 1e3 if lat else float("nan")
    text = _report("embedding server port", tally, seconds, good, growth)
    assert "Traceback" not in c.logs(), c.logs()[-3000:]
    _assert_clean(tally, good, growth, text)


class _UnauthenticatedFuzzer:
    """One hostile frame per fresh connection, before any authentication: each must be answered
    (AUTH_CHALLENGE for a HELLO, else ERROR UNAUTHENTICATED and a close)."""

    def __init__(self, port: int, factory: FrameFactory, tally: Tally) -> None:
        self.port, self.factory, self.tally = port, factory, tally

    def run(self, n: int) -> None:
        for i in range(n):
            frame = self.factory.keep_alive(i + 1)
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                self.tally.add(sent=1, connections=1)
                try:
                    s.sendall(frame)
                    ftype, _aux, _payload = read_frame(s)
                except socket.timeout:
                    self.tally.add(hangs=1)
                    self.tally.problem("unauthenticated frame: no answer within 10 s")
                    continue
                except (ConnectionError, OSError):
                    self.tally.add(unanswered=1)
                    self.tally.problem("unauthenticated frame: closed without an answer")
                    continue
                if ftype in (FrameType.ERROR, FrameType.AUTH_CHALLENGE):
                    self.tally.add(answered=1)
                else:
                    self.tally.add(unanswered=1)
                    self.tally.problem(f"unauthenticated frame answered with type {ftype}: it read something")
