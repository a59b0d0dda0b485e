"""The shared secret file, the HMAC proofs, the AUTH frames, and the config checks around them."""

from __future__ import annotations

import os

import pytest

from flexemr import auth
from flexemr.config import parse_config
from flexemr.errors import ConfigError, ProtocolError
from flexemr.wire import codec
from flexemr.wire.frame import HEADER_SIZE, FrameType, unpack_header


def _payload(frame: list) -> bytes:
    data = b"".join(bytes(memoryview(b).cast("B")) for b in frame)
    h = unpack_header(data)
    return h, data[HEADER_SIZE:]


def test_a_secret_file_readable_by_others_is_refused_naming_file_and_mode(tmp_path):
    path = tmp_path / "secret"
    path.write_text("x" * 40)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match=r"secret.*mode 0644.*0600 or stricter"):
        auth.load_secret(str(path))
    os.chmod(path, 0o600)
    assert auth.load_secret(str(path)) == b"x" * 40
    os.chmod(path, 0o400)
    assert auth.load_secret(str(path)) == b"x" * 40


def test_missing_short_and_symlinked_secrets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot open"):
        auth.load_secret(str(tmp_path / "nope"))
    short = tmp_path / "short"
    short.write_text("abc\n")
    os.chmod(short, 0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        auth.load_secret(str(short))
    link = tmp_path / "link"
    link.symlink_to(short)
    with pytest.raises(ConfigError, match="cannot open"):
        auth.load_secret(str(link))


def test_write_secret_makes_a_private_fresh_secret(tmp_path):
    path = str(tmp_path / "s")
    old = os.umask(0)
    try:
        a = auth.write_secret(path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert auth.load_secret(path) == a
    assert auth.write_secret(path) != a        # replaced, not reused


def test_proofs_bind_secret_nonces_identity_and_direction():
    ns, nr, ident = auth.new_nonce(), auth.new_nonce(), auth.hello_identity(1, 4, "tok/0/data")
    p = auth.ranker_proof(b"k" * 32, ns, nr, ident)
    assert auth.verify(p, auth.ranker_proof(b"k" * 32, ns, nr, ident))
    assert not auth.verify(p, auth.ranker_proof(b"j" * 32, ns, nr, ident))
    assert not auth.verify(p, auth.ranker_proof(b"k" * 32, auth.new_nonce(), nr, ident))
    assert not auth.verify(p, auth.ranker_proof(b"k" * 32, ns, nr, auth.hello_identity(1, 4, "tok/1/data")))
    assert not auth.verify(p, auth.server_proof(b"k" * 32, ns, nr, ident))   # no reflection
    assert auth.new_nonce() != auth.new_nonce()


def test_auth_frames_round_trip_and_reject_bad_sizes():
    nonce = auth.new_nonce()
    h, body = _payload(codec.encode_auth_challenge(3, nonce))
    assert h.type == FrameType.AUTH_CHALLENGE and h.request_id == 3
    ch = codec.decode_auth_challenge(body)
    assert ch.nonce == nonce and ch.message == "authentication required"
    mac = auth.ranker_proof(b"k" * 32, nonce, nonce, b"")
    h, body = _payload(codec.encode_auth_proof(4, nonce, mac))
    assert codec.decode_auth_proof(body) == (nonce, mac)
    with pytest.raises(ProtocolError, match="AUTH_PROOF: payload is 71 bytes"):
        codec.decode_auth_proof(body[:-1])
    with pytest.raises(ProtocolError, match="AUTH_CHALLENGE"):
        codec.decode_auth_challenge(body[:4])
    h, body = _payload(codec.encode_auth_ok(5, mac))
    assert codec.decode_auth_ok(body) == mac
    with pytest.raises(ProtocolError, match="AUTH_OK"):
        codec.decode_auth_ok(body + b"x")


@pytest.mark.parametrize("listen", ["0.0.0.0:7001", ":7001", "10.1.2.3:7001", "myhost:7001"])
def test_an_embedding_host_beyond_loopback_without_a_secret_refuses_to_start(listen):
    doc = {"daemon": {"role": "embedding"}, "embedding": {"listen": listen}}
    with pytest.raises(ConfigError, match=r"\[embedding\].listen.*secret_file.*insecure = true"):
        parse_config(doc)
    parse_config({**doc, "embedding": {"listen": listen, "insecure": True}})
    parse_config({"daemon": {"role": "embedding", "secret_file": "/etc/flexemr/secret"}, "embedding": {"listen": listen}})


@pytest.mark.parametrize("listen", ["127.0.0.1:7001", "localhost:7001", "127.1.2.3:7001"])
def test_an_embedding_host_on_loopback_needs_no_secret(listen):
    parse_config({"daemon": {"role": "embedding"}, "embedding": {"listen": listen}})


def test_flexemrd_run_refuses_a_world_readable_secret(tmp_path, tiny_model):
    import subprocess
    import sys

    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    os.chmod(secret, 0o640)
    cfg = tmp_path / "emb.toml"
    cfg.write_text(f'[daemon]\nrole = "embedding"\nmodel = "{tiny_model}"\nsecret_file = "{secret}"\n'
                   '[embedding]\nlisten = "127.0.0.1:0"\n')
    out = subprocess.run([sys.executable, "-m", "flexemrd", "run", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert str(secret) in out.stderr and "mode 0640" in out.stderr, out.stderr
