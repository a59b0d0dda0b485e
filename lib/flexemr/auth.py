"""Peer authentication between rankers and embedding servers: a shared secret and HMAC proofs.

The secret is a file (``[daemon].secret_file``) readable by its owner only
(mode 0600 or stricter).  Both sides prove they know it inside the HELLO
exchange (docs/PROTOCOL.md, *Authentication*)::

    ranker                                   embedding server
      HELLO (role, name, credits)      ->
                                       <-    AUTH_CHALLENGE (server nonce Ns)
      AUTH_PROOF (Nr, HMAC(K, "ranker" | Ns | Nr | identity))  ->
                                       <-    AUTH_OK (HMAC(K, "server" | Ns | Nr | identity))
      HELLO (again, now authenticated) ->
                                       <-    HELLO (name, shards)

``identity`` is the ranker's first HELLO (role, credits, name), so a proof
cannot be moved to another connection's name.  Both nonces are fresh random
32-byte strings, so a recorded exchange replayed against a server fails (its
``Ns`` differs) and a fake server cannot answer a ranker (its ``Nr``
differs); the two labels keep one side's proof from being reflected as the
other's.  This authenticates peers; it does not encrypt or protect frames
after the handshake (TLS may come later).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat

from flexemr.errors import ConfigError

__all__ = [
    "ALG_HMAC_SHA256", "MAC_BYTES", "NONCE_BYTES", "SECRET_MIN_BYTES", "hello_identity", "load_secret",
    "new_nonce", "ranker_proof", "server_proof", "verify", "write_secret",
]

ALG_HMAC_SHA256 = 1
NONCE_BYTES = 32
MAC_BYTES = 32
SECRET_MIN_BYTES = 16        # after stripping surrounding whitespace
_SECRET_MAX_BYTES = 4096     # a secret file is a key, not a data file
_RANKER_LABEL = b"flexemr-auth-v1 ranker\0"
_SERVER_LABEL = b"flexemr-auth-v1 server\0"


def load_secret(path: str) -> bytes:
    """The secret in ``path``; ConfigError naming the file unless it is a private regular file holding one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"[daemon].secret_file: cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"[daemon].secret_file: {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(f"[daemon].secret_file: {path} has mode {mode:04o}; it must be 0600 or stricter "
                              f"(readable by its owner only): chmod 600 {path}")
        if st.st_uid not in (os.geteuid(), 0):
            raise ConfigError(f"[daemon].secret_file: {path} is owned by uid {st.st_uid}, not by this user "
                              f"({os.geteuid()}) or root")
        raw = os.read(fd, _SECRET_MAX_BYTES + 1)
    finally:
        os.close(fd)
    secret = raw.strip()
    if len(raw) > _SECRET_MAX_BYTES:
        raise ConfigError(f"[daemon].secret_file: {path} is larger than {_SECRET_MAX_BYTES} bytes: not a secret file")
    if len(secret) < SECRET_MIN_BYTES:
        raise ConfigError(f"[daemon].secret_file: {path} holds {len(secret)} bytes; a secret needs at least "
                          f"{SECRET_MIN_BYTES} (generate one: head -c 32 /dev/urandom | base64 > {path})")
    return secret


def write_secret(path: str) -> bytes:
    """Create ``path`` (mode 0600, replacing a stale file) holding a fresh random secret; returns it."""
    secret = secrets.token_hex(32).encode()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # explicitly: not whatever the umask leaves
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)
    return secret


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def hello_identity(role: int, credits: int, name: str) -> bytes:
    """What a proof binds: the ranker's HELLO as the server received it."""
    return f"{role}:{credits}:{name}".encode("utf-8", "replace")


def _mac(label: bytes, secret: bytes, server_nonce: bytes, ranker_nonce: bytes, identity: bytes) -> bytes:
    return hmac.new(secret, label + server_nonce + ranker_nonce + identity, hashlib.sha256).digest()


def ranker_proof(secret: bytes, server_nonce: bytes, ranker_nonce: bytes, identity: bytes) -> bytes:
    """The ranker's proof of knowing ``secret`` for this challenge."""
    return _mac(_RANKER_LABEL, secret, server_nonce, ranker_nonce, identity)


def server_proof(secret: bytes, server_nonce: bytes, ranker_nonce: bytes, identity: bytes) -> bytes:
    """The server's proof back (another label: a ranker's proof is never a valid server proof)."""
    return _mac(_SERVER_LABEL, secret, server_nonce, ranker_nonce, identity)


def verify(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(expected, bytes(got))
