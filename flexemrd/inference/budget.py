"""A count of bytes this process holds for clients, under one limit (thread-safe).

The socket front keeps two: buffered request bytes (``[ranker].max_inflight_request_bytes``)
and mapped reply regions (``max_reply_region_bytes``); both refuse what would
exceed the limit instead of waiting, so a client's excess is answered, never queued.
"""

from __future__ import annotations

import threading

__all__ = ["ByteBudget"]


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Hold ``n`` more bytes if that stays within the limit; False (nothing held) otherwise."""
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n
