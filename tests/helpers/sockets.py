"""Raw-socket helpers for tests that speak the wire protocol by hand (hostile or unauthenticated peers)."""

from __future__ import annotations

import socket

__all__ = ["recv_exact"]


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``s``; ConnectionError saying how far it got when the peer closes first."""
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out
