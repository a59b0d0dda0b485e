"""Rate-limited warnings about a peer's mistakes: one line per peer per interval, never a traceback.

A peer that sends garbage in a loop must not fill the journal: the first
problem of a peer is logged at once, later ones within ``interval_s`` are
counted and the count is reported with the next line for that peer.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["PeerWarnings"]


class PeerWarnings:
    """``warn(peer, kind, fmt, *args)``: at most one WARNING line per (peer host, kind) per ``interval_s``.

    ``kind`` groups mistakes ("bad-frame", "wrong-secret", ...), so that a flood
    of one kind from a host does not hide the first of another.  Thread-safe.
    """

    MAX_PEERS = 4096  # remembered peers; beyond this the oldest are forgotten (an attacker may vary its address)

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}   # peer -> (when logged, suppressed since)
        self._lock = threading.Lock()

    def warn(self, peer: str, kind: str, fmt: str, *args: object) -> bool:
        """Log ``fmt % args`` for ``peer`` unless its kind was logged recently for that host; True when logged."""
        key = (peer_host(peer), kind)
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (-1e18, 0))
            if now - last < self.interval_s:
                self._last[key] = (last, suppressed + 1)
                return False
            if len(self._last) >= self.MAX_PEERS:
                for old in list(self._last)[: self.MAX_PEERS // 4]:
                    del self._last[old]
            self._last[key] = (now, 0)
        tail = f" ({suppressed} more of this kind from this host suppressed in the last {self.interval_s:.0f} s)" if suppressed else ""
        self.logger.warning("peer %s: " + fmt + "%s", peer, *args, tail)
        return True


def peer_host(peer: str) -> str:
    """The host part of ``"host:port"`` (each connection of one host has another port); other names as they are."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer
