"""The embedding server's side of authentication: one ``ServerHandshake`` per connection.

States of a connection on a server that has a secret::

    unauthenticated --HELLO--> challenged --AUTH_PROOF (valid)--> authenticated
          |                        |
          |                        +--AUTH_PROOF (invalid) / anything else--> ERROR, closed
          +--anything but HELLO / AUTH_PROOF--> ERROR UNAUTHENTICATED, closed

Before authentication a HELLO is answered with AUTH_CHALLENGE only (a nonce
and "authentication required": no name, no shards), every other frame with
ERROR UNAUTHENTICATED and the connection is closed.  A challenge's nonce
answers one proof only: a second proof, or a replayed one, fails.  Without a
secret (``[embedding].insecure`` on loopback) every connection starts
authenticated.  The event loop (server.py) asks ``admits`` for each frame
and hands HELLO / AUTH_PROOF here; this module never touches sockets.
"""

from __future__ import annotations

from flexemr import auth
from flexemr.errors import ProtocolError
from flexemr.wire import codec
from flexemr.wire.frame import ErrorCode, FrameType, Header

__all__ = ["AuthRefused", "ServerHandshake", "UNAUTHENTICATED_MAX_PAYLOAD"]

# A peer that has not authenticated may only send a HELLO or an AUTH_PROOF:
# frames larger than this are refused before a byte of them is buffered.
UNAUTHENTICATED_MAX_PAYLOAD = 64 << 10


class AuthRefused(ProtocolError):
    """The peer failed authentication: answer with this ERROR, then close the connection."""

    def __init__(self, message: str, log_reason: str, kind: str = "unauthenticated") -> None:
        super().__init__(message, ErrorCode.UNAUTHENTICATED)
        self.log_reason = log_reason     # for the server's log (more detail than the peer is told)
        self.kind = kind                 # rate-limit group of the log line: "unauthenticated", "wrong-secret"


class ServerHandshake:
    """Authentication state of one connection (``secret`` None: no authentication required)."""

    __slots__ = ("_secret", "authenticated", "_nonce", "_identity")

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret
        self.authenticated = secret is None
        self._nonce: bytes | None = None
        self._identity = b""

    def admits(self, ftype: int) -> bool:
        """May a frame of this type be served now?  (HELLO and AUTH_PROOF always reach ``on_*``.)"""
        return self.authenticated or ftype in (FrameType.HELLO, FrameType.AUTH_PROOF)

    def refuse(self, h: Header) -> AuthRefused:
        """The error for a frame that ``admits`` turned away."""
        try:
            name = FrameType(h.type).name
        except ValueError:
            name = str(h.type)
        return AuthRefused("not authenticated: this embedding server requires authentication (HELLO, then "
                           "AUTH_PROOF) before any other frame; closing the connection",
                           f"sent {name} before authenticating")

    def on_hello(self, h: Header, hello: codec.Hello) -> list | None:
        """None: serve the HELLO as usual; else the AUTH_CHALLENGE to answer it with."""
        if self.authenticated:
            return None
        self._nonce = auth.new_nonce()
        self._identity = auth.hello_identity(hello.role, h.aux, hello.name)
        return codec.encode_auth_challenge(h.request_id, self._nonce)

    def on_proof(self, h: Header, payload: memoryview) -> list:
        """Check an AUTH_PROOF: the AUTH_OK to answer with, or AuthRefused (then close)."""
        if self._secret is None:
            raise ProtocolError("AUTH_PROOF: this server requires no authentication", ErrorCode.UNSUPPORTED)
        if self.authenticated:
            raise ProtocolError("AUTH_PROOF: this connection is already authenticated", ErrorCode.BAD_FRAME)
        nonce, self._nonce = self._nonce, None      # one proof per challenge: a second attempt finds none
        if nonce is None:
            raise AuthRefused("authentication failed: AUTH_PROOF without a challenge (send HELLO first)",
                              "sent AUTH_PROOF without a challenge", kind="bad-proof")
        try:
            ranker_nonce, mac = codec.decode_auth_proof(payload)
        except ProtocolError as e:
            raise AuthRefused(f"authentication failed: {e}", f"malformed AUTH_PROOF ({e})", kind="bad-proof") from None
        if not auth.verify(auth.ranker_proof(self._secret, nonce, ranker_nonce, self._identity), mac):
            raise AuthRefused("authentication failed: the proof does not match this server's secret "
                              "(check [daemon].secret_file on both hosts)",
                              "wrong secret (its proof did not verify)", kind="wrong-secret")
        self.authenticated = True
        return codec.encode_auth_ok(h.request_id, auth.server_proof(self._secret, nonce, ranker_nonce, self._identity))
