"""Authentication between rankers and embedding servers, probed as an attacker on the host would.

A real ``flexemrd local`` cluster (which makes its own secret); raw TCP
sockets play the attacker: unauthenticated reads, a wrong secret, a
replayed handshake, a malformed HELLO.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time

import numpy as np
import pytest

from flexemr import auth, naming
from flexemr.client import InferenceClient
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, ErrorCode, FrameType, pack_header, unpack_header

from tests.conftest import LocalCluster
from tests.helpers.sockets import recv_exact


@pytest.fixture(scope="module")
def authcluster(tiny_model, tmp_path_factory):
    # TCP: these tests attack the embedding servers' network port (shm has its own, uid-checked rendezvous).
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("auth"), servers=2, engines=1, extra=["--transport", "tcp"])
    yield c
    c.stop()


def server_ports(c: LocalCluster) -> list[int]:
    """The embedding servers' ports (the supervisor holds their listening sockets)."""
    return c.listening_ports()


def recv_frame(s: socket.socket):
    h = unpack_header(recv_exact(s, HEADER_SIZE), 1 << 30)
    return h, recv_exact(s, h.payload_len)


def send(s: socket.socket, frame: list) -> bytes:
    data = b"".join(bytes(memoryview(b).cast("B")) for b in frame)
    s.sendall(data)
    return data


def closed_after(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def handshake(s: socket.socket, secret: bytes, name: str = "probe/0/data") -> list[bytes]:
    """A ranker's handshake by hand; returns the bytes it sent (for the replay test)."""
    sent = [send(s, codec.encode_hello(0, codec.ROLE_RANKER, name))]
    h, payload = recv_frame(s)
    assert h.type == FrameType.AUTH_CHALLENGE
    ch = codec.decode_auth_challenge(payload)
    nonce = auth.new_nonce()
    identity = auth.hello_identity(codec.ROLE_RANKER, 0, name)
    sent.append(send(s, codec.encode_auth_proof(1, nonce, auth.ranker_proof(secret, ch.nonce, nonce, identity))))
    h, payload = recv_frame(s)
    assert h.type == FrameType.AUTH_OK, codec.decode_error(payload)
    assert auth.verify(auth.server_proof(secret, ch.nonce, nonce, identity), codec.decode_auth_ok(payload))
    return sent


UNAUTHENTICATED_FRAMES = {
    "FETCH": lambda: codec.encode_fetch(5, 0, np.arange(4, dtype=np.int64)),
    "STATS": lambda: [pack_header(FrameType.STATS, 6, 0)],
    "PING": lambda: [pack_header(FrameType.PING, 7, 0)],
}


@pytest.mark.parametrize("kind", [*UNAUTHENTICATED_FRAMES, "LOOKUP"])
def test_unauthenticated_frames_read_nothing_and_close(authcluster, kind):
    for port in server_ports(authcluster):
        with connect(port) as s:
            if kind == "LOOKUP":
                frame = codec.encode_lookup(8, 1, [0], [np.array([1], np.int32)], [np.array([3], np.int64)])
            else:
                frame = UNAUTHENTICATED_FRAMES[kind]()
            send(s, frame)
            h, payload = recv_frame(s)
            assert h.type == FrameType.ERROR and h.aux == ErrorCode.UNAUTHENTICATED
            assert "not authenticated" in codec.decode_error(payload)
            assert closed_after(s)


def test_hello_reveals_only_that_authentication_is_required(authcluster):
    for port in server_ports(authcluster):
        with connect(port) as s:
            send(s, codec.encode_hello(0, codec.ROLE_RANKER, "curious/0/data"))
            h, payload = recv_frame(s)
            assert h.type == FrameType.AUTH_CHALLENGE
            ch = codec.decode_auth_challenge(payload)
            assert ch.message == "authentication required"
            assert b"embedding" not in payload          # no server name, no shard table
            assert len(payload) == 8 + auth.NONCE_BYTES + len("authentication required") + 1  # + NUL pad
            # ... and after the challenge, data frames are still refused.
            send(s, codec.encode_fetch(9, 0, np.arange(3, dtype=np.int64)))
            h, _ = recv_frame(s)
            assert h.type == FrameType.ERROR and h.aux == ErrorCode.UNAUTHENTICATED
            assert closed_after(s)


def test_wrong_secret_is_refused_and_logged_with_the_peer(authcluster):
    port = server_ports(authcluster)[0]
    with connect(port) as s:
        send(s, codec.encode_hello(0, codec.ROLE_RANKER, "intruder/0/data"))
        h, payload = recv_frame(s)
        ch = codec.decode_auth_challenge(payload)
        nonce = auth.new_nonce()
        wrong = auth.ranker_proof(b"not-the-secret-at-all", ch.nonce, nonce,
                                  auth.hello_identity(codec.ROLE_RANKER, 0, "intruder/0/data"))
        send(s, codec.encode_auth_proof(1, nonce, wrong))
        h, payload = recv_frame(s)
        assert h.type == FrameType.ERROR and h.aux == ErrorCode.UNAUTHENTICATED
        assert "authentication failed" in codec.decode_error(payload)
        assert closed_after(s)
        me = "127.0.0.1:%d" % s.getsockname()[1]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and me not in authcluster.logs():
        time.sleep(0.1)
    lines = [ln for ln in authcluster.logs().splitlines() if me in ln]
    assert lines and "wrong secret" in lines[0], authcluster.logs()[-2000:]
    assert "Traceback" not in authcluster.logs()


def test_the_right_secret_reads_rows(authcluster):
    secret = auth.load_secret(naming.local_secret_path(authcluster.instance))
    port = server_ports(authcluster)[0]
    with connect(port) as s:
        handshake(s, secret)
        send(s, codec.encode_hello(2, codec.ROLE_RANKER, "probe/0/data"))
        h, payload = recv_frame(s)
        assert h.type == FrameType.HELLO and len(codec.decode_hello(payload).shards) > 0
        send(s, [pack_header(FrameType.STATS, 3, 0)])
        h, _ = recv_frame(s)
        assert h.type == FrameType.STATS_RESP


def test_a_replayed_handshake_fails(authcluster):
    secret = auth.load_secret(naming.local_secret_path(authcluster.instance))
    port = server_ports(authcluster)[0]
    with connect(port) as s:
        recorded = handshake(s, secret)
    with connect(port) as s:   # the attacker replays every byte the ranker sent
        s.sendall(recorded[0])
        h, _ = recv_frame(s)
        assert h.type == FrameType.AUTH_CHALLENGE      # a fresh nonce ...
        s.sendall(recorded[1])
        h, payload = recv_frame(s)                      # ... which the recorded proof does not answer
        assert h.type == FrameType.ERROR and h.aux == ErrorCode.UNAUTHENTICATED, payload
        assert closed_after(s)


def test_malformed_hello_is_answered_without_a_traceback(authcluster):
    port = server_ports(authcluster)[0]
    with connect(port) as s:
        bad = struct.pack("<I", 1)   # role only: no shard count
        s.sendall(pack_header(FrameType.HELLO, 11, len(bad)) + bad)
        h, payload = recv_frame(s)
        assert h.type == FrameType.ERROR and h.request_id == 11
        assert "HELLO" in codec.decode_error(payload)
        # The connection is kept: a good HELLO still gets its challenge.
        send(s, codec.encode_hello(12, codec.ROLE_RANKER, "fixed/0/data"))
        h, _ = recv_frame(s)
        assert h.type == FrameType.AUTH_CHALLENGE and h.request_id == 12
    time.sleep(0.5)
    assert "Traceback" not in authcluster.logs()


def test_cluster_still_answers_and_its_secret_is_private(authcluster, tiny_model):
    path = naming.local_secret_path(authcluster.instance)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with InferenceClient(authcluster.socket) as client:
        from flexemr.model.spec import load_spec

        spec = load_spec(tiny_model)
        sparse = {t.name: (np.array([1, 2, 3], np.int64), np.array([2, 1], np.int32)) for t in spec.tables}
        scores = client.predict(np.zeros((2, spec.dense_features), np.float32), sparse)
        assert scores.shape == (2,) and np.isfinite(scores).all()


def test_local_removes_its_secret_at_stop(tiny_model, tmp_path):
    c = LocalCluster(tiny_model, tmp_path, servers=1, engines=1, extra=["--transport", "tcp"])
    path = naming.local_secret_path(c.instance)
    try:
        assert os.path.exists(path)
    finally:
        c.stop()
    assert not os.path.exists(path)
