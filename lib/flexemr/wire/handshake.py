"""The requester's side of HELLO with an embedding server, authenticating when asked (docs/PROTOCOL.md).

``client_hello`` works over any frame stream given as two callables, so the
engine's connections (any transport) and tools on plain sockets share it::

    HELLO -> AUTH_CHALLENGE -> AUTH_PROOF -> AUTH_OK (checked) -> HELLO -> HELLO (shards)
    HELLO -> HELLO                                   (a server without a secret)
"""

from __future__ import annotations

from typing import Callable

from flexemr import auth
from flexemr.errors import ProtocolError
from flexemr.wire import codec
from flexemr.wire.frame import FrameType, Header

__all__ = ["client_hello"]

Send = Callable[[list], object]
Recv = Callable[[], "tuple[Header, memoryview]"]


def client_hello(send: Send, recv: Recv, who: str, role: int, name: str, credits: int = 0,
                 secret: bytes | None = None, require_auth: bool | None = None, blob: bytes = b"") -> codec.Hello:
    """Say HELLO as ``name`` and return the server's HELLO; ProtocolError naming ``who`` when refused.

    ``require_auth`` (default: ``secret is not None``) refuses a server that does
    not challenge us: with a secret we want the server's proof too.
    """
    require = secret is not None if require_auth is None else require_auth
    send(codec.encode_hello(0, role, name, credits=credits, blob=blob))
    h, payload = _answer(recv, who, "HELLO")
    if h.type == FrameType.AUTH_CHALLENGE:
        if secret is None:
            raise ProtocolError(f"{who} requires authentication but no secret is configured: set "
                                "[daemon].secret_file to the same secret file on both hosts")
        _prove(send, recv, who, secret, codec.decode_auth_challenge(payload), auth.hello_identity(role, credits, name))
        send(codec.encode_hello(0, role, name, credits=credits, blob=blob))
        h, payload = _answer(recv, who, "HELLO")
    elif require and h.type == FrameType.HELLO:
        raise ProtocolError(f"{who} did not ask us to authenticate, so it cannot prove it knows "
                            "[daemon].secret_file: refusing it (give it the same secret file)")
    if h.type != FrameType.HELLO:
        raise ProtocolError(f"{who} answered HELLO with frame type {h.type}")
    return codec.decode_hello(payload)


def _answer(recv: Recv, who: str, what: str) -> tuple[Header, memoryview]:
    h, payload = recv()
    if h.type == FrameType.ERROR:
        raise ProtocolError(f"{who} refused us: {codec.decode_error(payload)} (answering our {what})")
    return h, payload


def _prove(send: Send, recv: Recv, who: str, secret: bytes, challenge: codec.AuthChallenge, identity: bytes) -> None:
    """Prove we know ``secret``, then check the server's proof back (a fresh nonce of ours: no replay)."""
    nonce = auth.new_nonce()
    send(codec.encode_auth_proof(0, nonce, auth.ranker_proof(secret, challenge.nonce, nonce, identity)))
    h, payload = _answer(recv, who, "AUTH_PROOF")
    if h.type != FrameType.AUTH_OK:
        raise ProtocolError(f"{who} answered AUTH_PROOF with frame type {h.type}")
    if not auth.verify(auth.server_proof(secret, challenge.nonce, nonce, identity), codec.decode_auth_ok(payload)):
        raise ProtocolError(f"{who} failed to prove it knows [daemon].secret_file: refusing it")
